"""Soft targets: a teacher's top-k prediction as a distribution over every class."""
from __future__ import annotations

import numpy as np


def dense(ids, probs, num_classes: int) -> np.ndarray:
    """The top-k ``ids`` / ``probs`` as a distribution over ``num_classes``: the mass outside the top k spread
    evenly over the other classes (calibrated probabilities keep their sum), normalised."""
    out = np.zeros(num_classes, dtype=np.float64)
    ids = [int(i) for i in ids]
    if len(ids) < num_classes:
        out += max(0.0, 1.0 - float(sum(probs))) / (num_classes - len(ids))
    out[ids] = [float(p) for p in probs]
    return out / out.sum()
