"""Self-training rounds (Noisy Student, Xie et al. 2020): the trained model labels the bucket it learned
from, its confident predictions join the human labels, a noised student trains on both, and the
student becomes the next teacher.

Layout under the configured ``run.out_dir`` (ROOT), every round a run folder of its own:

  ROOT/round-0/                       the configured run
  ROOT/round-K/                       round K's student (K >= 1), a run folder
  ROOT/round-K/teacher_predictions/   round K-1's predictions for data.unlabeled (distssl-predict's output)
  ROOT/round-K/pseudo_labeled/        its confident ones as a labeled shard set (index.json last)
  ROOT/selftrain.json                 each finished round's top-1, teacher and pseudo-label count

Every step is resumable on its own (a run resumes from its checkpoints, a prediction writes only its
missing parts, a pseudo-labeled shard only when its stats are missing), so rerunning the command
continues the round in progress and passes over the finished ones without rewriting them.
``round_config`` is a pure function of the base config and the round, so every rank, and every rerun,
agrees on what round K is.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Optional

from distssl.config import Config
from distssl.data.spec import DataSpec, data_sources

PREDICTIONS = "teacher_predictions"
PSEUDO = "pseudo_labeled"
RECORD = "selftrain.json"


def round_dir(root: str, k: int) -> str:
    return str(Path(root) / f"round-{k}")


def round_config(base: Config, k: int, root: Optional[str] = None) -> Config:
    """Round ``k``'s run: round 0 the configured one in ROOT/round-0; a student (k >= 1) trains on the
    human labels plus round k-1's pseudo-labeled set, with the selftrain section's model and noise."""
    root = root or base.run.out_dir
    cfg = copy.deepcopy(base)
    cfg.run.out_dir = round_dir(root, k)
    if k == 0:
        return cfg
    st = cfg.selftrain
    pseudo = str(Path(cfg.run.out_dir) / PSEUDO)
    human = data_sources(base.data.labeled)
    if st.pseudo_weight is None:  # one list: every image once per epoch, whatever its origin
        labeled = [p for p, _ in human] + [pseudo]
    else:  # the human sets keep their relative weights (1 each when they had none), summing to 1
        weights = [w if w is not None else 1.0 for _, w in human]
        total = sum(weights)
        labeled = [{"path": p, "weight": w / total} for (p, _), w in zip(human, weights)] + \
            [{"path": pseudo, "weight": float(st.pseudo_weight)}]
    cfg.data.labeled = DataSpec.coerce_value("data.labeled", labeled)
    if not st.ssl:
        cfg.ssl.lambda_u = 0.0  # labels + pseudo-labels alone, the paper's student
    student = st.student_model or base.model.name
    if student != base.model.name:
        cfg.model.name = student
        cfg.model.pretrained = None  # the base's weights are another architecture's
    if st.init_from_teacher and student == base.model.name:
        cfg.model.pretrained = str(Path(round_dir(root, k - 1)) / "model.safetensors")
    cfg.model.drop_rate, cfg.model.drop_path_rate = st.drop_rate, st.drop_path_rate
    if st.strong_view:
        cfg.data.labeled_view = "strong"
    return cfg


def read_record(root: str) -> list[dict]:
    try:
        return json.loads((Path(root) / RECORD).read_text())["rounds"]
    except (OSError, ValueError, KeyError):
        return []


def write_record(root: str, rounds: list[dict]) -> bool:
    """ROOT/selftrain.json (atomically), only when it changes: a rerun of finished rounds rewrites nothing."""
    from distssl import atomic

    text = json.dumps({"rounds": rounds}, indent=1)
    path = Path(root) / RECORD
    if path.exists() and path.read_text() == text:
        return False
    atomic.write_text(path, text)
    return True


def round_entry(cfg: Config, k: int, result: dict, pseudo: Optional[dict]) -> dict:
    """What selftrain.json keeps of a finished round (its summary.json's top-1s where the result lacks them)."""
    try:
        summary = json.loads((Path(cfg.run.out_dir) / "summary.json").read_text())
    except (OSError, ValueError):
        summary = {}
    entry = {"round": k, "out_dir": cfg.run.out_dir, "model": cfg.model.name,
             "top1": result.get("top1", summary.get("top1")), "best_top1": result.get("best_top1",
                                                                                   summary.get("best_top1")),
             "ssl_loss": cfg.ssl.lambda_u > 0}
    if pseudo is not None:
        labels = pseudo.get("pseudo_labels", {})
        entry.update(teacher=labels.get("teacher"), min_confidence=labels.get("min_confidence"),
                     pseudo_labeled=pseudo.get("count"), predicted=labels.get("predicted"))
    return entry
