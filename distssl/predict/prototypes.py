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

import torch

from distssl.outliers import FALSE_UNKNOWN, class_prototypes, prototype_scores, unknown_threshold
from distssl.predict.model import predictor_from
from distssl.predict.parts import make_parts
from distssl.predict.rank_parts import labeled_outputs
from distssl.ssl.component import OUTLIER_HEAD
from distssl.storage import store

log = logging.getLogger(__name__)
PROTOTYPES_KEY = f"{OUTLIER_HEAD}_prototypes"  # beside the head's own weights, under no module's prefix


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
        feats, labels = _features(predictor, labeled, device, batch_size, cap_per_class=per_class, cap=labeled_max)
        prototypes = class_prototypes(feats, labels, num_classes)
        inside_feats, _ = _features(predictor, inside, device, batch_size, cap=inside_max)
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


def _features(predictor, spec, device: torch.device, batch_size: int, **caps) -> tuple[torch.Tensor, torch.Tensor]:
    """(pooled features, labels in the model's order) of the labelled samples of ``spec``, up to ``caps``."""
    feats, labels = labeled_outputs(predictor, make_parts(spec), batch_size, device, 2, **caps)
    if not feats:
        raise ValueError(f"{store.redact(str(spec))} has no sample with a label the model knows")
    return torch.cat(feats), torch.cat(labels)
