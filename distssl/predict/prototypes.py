"""The class prototypes an export with an outlier head carries (distssl.outliers): fitted when the export is
written, by the run (distssl.train.outputs) or by distssl-export from a checkpoint, with the exported weights
themselves, so the score at prediction compares features of one network.

- prototypes: the mean normalised feature of up to ``per_class`` labelled images of each class (data.labeled;
  at most ``labeled_max`` read in all, so rank 0's export of a 1,000-class run reads seconds, not the set);
- ``unknown_at``: the score that 5% of up to ``inside_max`` eval images reach (data.eval: every one of its
  images is inside the label set).
"""
from __future__ import annotations

import logging
from typing import Optional

import torch

from distssl.outliers import FALSE_UNKNOWN, class_prototypes, prototype_scores, unknown_threshold
from distssl.predict.model import predictor_from
from distssl.predict.parts import make_parts
from distssl.predict.rank_parts import batches_of, label_map, model_label, outputs_of
from distssl.ssl.component import OUTLIER_HEAD
from distssl.storage import store

log = logging.getLogger(__name__)
PROTOTYPES_KEY = f"{OUTLIER_HEAD}_prototypes"  # beside the head's own weights, under no module's prefix


def labeled_features(predictor, spec, device: torch.device, batch_size: int, cap_per_class: Optional[int] = None,
                     cap: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(pooled features, labels in the model's order) of the labelled samples of ``spec``, reading stops once
    every class has ``cap_per_class`` of them (or ``cap`` in all)."""
    num_classes = int(predictor.meta["num_classes"])
    parts = make_parts(spec)
    maps = {p.number: label_map(p.class_names, predictor.class_names) for p in parts}
    feats, labels = [], []
    counts = torch.zeros(num_classes, dtype=torch.long)
    for b in batches_of(predictor, parts, batch_size, 0):
        if b.x is None:
            continue
        ys = torch.tensor([model_label(s.true_label, maps[b.part]) for s in b.samples])
        keep = ys >= 0
        if cap_per_class is not None:
            keep &= counts[ys.clamp(min=0)] < cap_per_class
        if keep.any():
            feats.append(outputs_of(predictor, b.x[keep], device)[2])
            labels.append(ys[keep])
            counts += torch.bincount(ys[keep], minlength=num_classes)
        if (cap_per_class is not None and bool((counts >= cap_per_class).all())) or \
                (cap is not None and int(counts.sum()) >= cap):
            break
    if not feats:
        raise ValueError(f"{store.redact(str(spec))} has no sample with a label the model knows")
    return torch.cat(feats), torch.cat(labels)


def add_prototypes(state: dict, meta: dict, labeled, inside, device: torch.device, batch_size: int = 256,
                   per_class: int = 50, labeled_max: int = 20_000, inside_max: int = 2000) -> tuple[dict, dict]:
    """The export's state and model.json with the class prototypes and the calibrated ``unknown_at``; as they
    were (IOMatch's one-vs-all score at prediction) when either set cannot be read, with a warning."""
    if not labeled or not inside:
        log.warning("the export keeps IOMatch's one-vs-all outlier score: the run names no %s set to fit the class "
                    "prototypes on", "labelled" if not labeled else "eval")
        return state, meta
    predictor = predictor_from(state, meta, device)
    num_classes = int(meta["num_classes"])
    try:
        feats, labels = labeled_features(predictor, labeled, device, batch_size, cap_per_class=per_class,
                                         cap=labeled_max)
        prototypes = class_prototypes(feats, labels, num_classes)
        inside_feats, _ = labeled_features(predictor, inside, device, batch_size, cap=inside_max)
        unknown_at = unknown_threshold(prototype_scores(inside_feats, prototypes))
    except (OSError, ValueError) as e:
        log.warning("the export keeps IOMatch's one-vs-all outlier score: the class prototypes could not be fitted "
                    "(%s)", str(e).splitlines()[0][:200])
        return state, meta
    missing = [predictor.class_names[c] if c < len(predictor.class_names) else str(c)
               for c in range(num_classes) if not bool((labels == c).any())]
    spec = {**meta["outlier_head"], "score": "prototypes", "prototypes": PROTOTYPES_KEY, "unknown_at": unknown_at,
            "prototype_images": int(len(labels)), "false_unknown": FALSE_UNKNOWN,
            "calibrated_on_images": int(len(inside_feats)), "classes_without_prototype": missing}
    return {**state, PROTOTYPES_KEY: prototypes.contiguous()}, {**meta, "outlier_head": spec}
