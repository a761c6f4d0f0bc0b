"""What a self-training round is, as pure functions: its run's config, its pseudo-labels from one or several
teachers, the class-balanced selection, and the student's length.

Noisy Student (Xie et al. 2020) gains because the student learns from filtered, class-balanced pseudo-labels
(the most confident ones per class up to a budget, a rare class's duplicated up to it), is noised (RandAugment,
dropout, stochastic depth), and trains longer on the larger set; the pseudo-labels may be the calibrated
probabilities of an ensemble of teachers. Everything here is a function of its inputs (the config, the
round, the teachers' predictions, a seed), so every rank and every rerun agrees on it.
"""
from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Optional

import numpy as np

from distssl.config import Config
from distssl.data.spec import DataSpec, data_sources
from distssl.data.targets import dense

PREDICTIONS = "teacher_predictions"
PSEUDO = "pseudo_labeled"


def round_dir(root: str, k: int) -> str:
    return str(Path(root) / f"round-{k}")


def student_batch(base: Config) -> int:
    """selftrain.batch_size, or the images a teacher's step reads (train.batch_size x (1 + mu)) for a student
    without the SSL loss; with it, the labeled batch as configured."""
    st = base.selftrain
    if st.batch_size is not None:
        return st.batch_size
    return base.train.batch_size * (1 if st.ssl else 1 + base.ssl.mu)


def student_steps(labeled_count: int, epochs: float, batch_size: int) -> int:
    """Steps for ``epochs`` passes over a labeled set of ``labeled_count`` images in batches of ``batch_size``."""
    return max(1, math.ceil(epochs * labeled_count / batch_size))


def round_config(base: Config, k: int, root: Optional[str] = None, labeled_count: Optional[int] = None) -> Config:
    """Round ``k``'s run: round 0 the configured one in ROOT/round-0; a student (k >= 1) trains on the
    human labels plus its pseudo-labeled set (``labeled_count`` images in all: its length is
    selftrain.epochs passes over them), with the selftrain section's model, targets and noise."""
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
        cfg.data.labeled_targets = st.targets
    cfg.train.batch_size = student_batch(base)
    if labeled_count is not None:
        cfg.train.steps = student_steps(labeled_count, st.epochs, cfg.train.batch_size)
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


def teachers_of(base: Config, k: int, root: str) -> list[str]:
    """Round ``k``'s teachers: the round before (first), every earlier round with selftrain.ensemble=all, then
    the models named in selftrain.teachers."""
    earlier = [round_dir(root, j) for j in range(k - 1, -1, -1)]
    own = earlier if base.selftrain.ensemble == "all" else earlier[:1]
    return own + list(base.selftrain.teachers)


def ensemble(predictions: list[list[tuple[list[int], list[float]]]], num_classes: int) -> np.ndarray:
    """The mean of several teachers' distributions for the same samples: ``predictions[t][i]`` is teacher t's
    (top-k ids, probabilities) of sample i. Returns samples x classes."""
    n = len(predictions[0])
    out = np.zeros((n, num_classes), dtype=np.float64)
    for teacher in predictions:
        for i, (ids, probs) in enumerate(teacher):
            out[i] += dense(ids, probs, num_classes)
    return out / len(predictions)


def balanced_budget(per_class: Optional[int], predicted: int, num_classes: int) -> int:
    """Pseudo-labels per class: selftrain.per_class, or the unlabeled set's size over the classes (a balanced
    set as large as the unlabeled one, as the paper's 130K a class for ImageNet's 1,000 classes); 0 = off."""
    return per_class if per_class is not None else max(1, round(predicted / num_classes))


def select(pred: np.ndarray, confidence: np.ndarray, num_classes: int, min_confidence: float, per_class: int,
           seed: int) -> np.ndarray:
    """How many times each sample enters the pseudo-labeled set (0: not at all). Samples under
    ``min_confidence`` leave; with ``per_class`` > 0 each class keeps its ``per_class`` most confident ones
    (ties in sample order), and a class with fewer has them duplicated at random up to ``per_class`` (the
    paper's balancing: "for classes with less than 130K images, we duplicate some images at random")."""
    copies = np.zeros(len(pred), dtype=np.int64)
    keep = confidence >= min_confidence
    if per_class <= 0:
        copies[keep] = 1
        return copies
    rng = np.random.default_rng(seed)
    for c in range(num_classes):
        idx = np.flatnonzero(keep & (pred == c))
        if idx.size == 0:
            continue
        top = idx[np.argsort(-confidence[idx], kind="stable")][:per_class]
        copies[top] = 1
        if top.size < per_class:
            np.add.at(copies, rng.choice(top, size=per_class - top.size, replace=True), 1)
    return copies
