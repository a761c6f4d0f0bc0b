"""A round's pseudo-labeled shard set from its teachers' predictions: their calibrated probabilities averaged
(one teacher: its own), filtered by confidence and balanced per class (distssl.selftrain.plan.select), each
chosen image written as often as the selection says, with its soft target when the student learns from them.

Every rank computes the same selection from every part's predictions (a pure function of them and the seed)
and writes the shards of its own parts; rank 0 writes index.json once every shard's stats are there. A shard
with stats is not written again, so a rerun continues where a killed one stopped.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from distssl.predict.parts import Part
from distssl.predict.pseudo import PseudoRow, shard_done, write_pseudo_shard
from distssl.predict.rank_parts import read_part
from distssl.selftrain.plan import balanced_budget, ensemble, select

SOFT_TOP = 10  # classes kept in a soft target (the rest of its mass spread evenly)


@dataclass
class PartPredictions:
    keys: list[tuple[str, str]]  # (key, source) of the samples every teacher predicted, in the first's order
    probs: np.ndarray  # samples x classes: the teachers' mean calibrated distribution
    true: list[Optional[int]]


def part_predictions(prediction_dirs: list[str], part: Part, num_classes: int) -> PartPredictions:
    """Part n as every teacher predicted it (distssl-predict's parts), averaged."""
    tables = []
    for out in prediction_dirs:
        rows = read_part(out, part, ["key", "source", "topk_ids", "topk_probs", "true_label", "unknown"])
        tables.append({(r["key"], r["source"]): r for r in rows})
    # an image a teacher's outlier head names unknown is no one's pseudo-label
    keys = [k for k in tables[0] if all(k in t and not t[k]["unknown"] for t in tables)]
    probs = ensemble([[(t[k]["topk_ids"], t[k]["topk_probs"]) for k in keys] for t in tables], num_classes) \
        if keys else np.zeros((0, num_classes))
    return PartPredictions(keys, probs, [tables[0][k]["true_label"] for k in keys])


def selection(prediction_dirs: list[str], parts: list[Part], num_classes: int, min_confidence: float,
              per_class: Optional[int], seed: int) -> tuple[dict[int, np.ndarray], dict]:
    """Each part's copies per sample (distssl.selftrain.plan.select over every part's predictions), and what
    the selection did (predicted, kept, the per-class budget)."""
    preds, confs, sizes = [], [], []
    for part in parts:
        p = part_predictions(prediction_dirs, part, num_classes).probs
        preds.append(p.argmax(axis=1))
        confs.append(p.max(axis=1))
        sizes.append(len(p))
    pred = np.concatenate(preds) if preds else np.zeros(0, dtype=np.int64)
    conf = np.concatenate(confs) if confs else np.zeros(0)
    budget = balanced_budget(per_class, len(pred), num_classes)
    copies = select(pred, conf, num_classes, min_confidence, budget, seed)
    bounds = np.cumsum([0, *sizes])
    by_part = {part.number: copies[bounds[i]:bounds[i + 1]] for i, part in enumerate(parts)}
    return by_part, {"predicted": int(len(pred)), "confident": int((conf >= min_confidence).sum()),
                     "distinct": int((copies > 0).sum()), "count": int(copies.sum()), "per_class": budget}


def write_set(prediction_dirs: list[str], dst: str, parts: list[Part], num_classes: int, copies: dict[int, np.ndarray],
              soft: bool, teacher: str, rank: int, world: int) -> int:
    """This rank's shards of DST (part n's chosen samples, each ``copies`` times); returns how many it wrote."""
    written = 0
    for part in parts:
        if part.number % world != rank or shard_done(dst, part):
            continue
        got = part_predictions(prediction_dirs, part, num_classes)
        chosen = {}
        for i, key in enumerate(got.keys):
            n = int(copies[part.number][i])
            if n == 0:
                continue
            p = got.probs[i]
            top = np.argsort(-p, kind="stable")[:SOFT_TOP]
            chosen[key] = PseudoRow(int(p.argmax()), float(p.max()), n, true_label=got.true[i],
                                    soft={"ids": top.tolist(), "probs": p[top].round(6).tolist()} if soft else None)
        write_pseudo_shard(dst, part, chosen, teacher, len(got.keys))
        written += 1
    return written
