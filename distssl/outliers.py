"""The outlier score of an export: how far an image's features lie from every labelled class.

IOMatch's one-vs-all head (distssl.ssl.open_set) learns "inside class k" from the labelled images alone; with a
few labels a class its score separated the digits outside the label set from those inside with an AUROC of
0.62-0.77 (docs/benchmarks.md, "Buckets as they are"). The same network's pooled features separate them far
better when compared with the labelled classes directly (the nearest-prototype rule of Snell et al. 2017, the
feature-distance detectors of Lee et al. 2018 and Sun et al. 2022 with the class means as the bank): each class's
prototype is the mean of its labelled images' L2-normalised features, and an image's score is one minus its
largest cosine similarity to a prototype (0: on a prototype; up to 2).

The threshold that names an image ``unknown`` is calibrated on images known to be inside the label set (the
run's eval set): the score that ``false_unknown`` of them reach. Pure functions of tensors, tested without a
model; distssl.predict.prototypes fits them on a run's sets.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

FALSE_UNKNOWN = 0.05  # the share of in-set images the calibrated threshold names unknown


def class_prototypes(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(num_classes, D): each class's mean of L2-normalised features, normalised; a class with no image gets a
    zero row (its cosine is 0 for every image: it never is the nearest of a class that has images)."""
    z = F.normalize(features.float(), dim=1)
    sums = torch.zeros(num_classes, z.shape[1], dtype=z.dtype).index_add_(0, labels.long(), z)
    return F.normalize(sums, dim=1)


def prototype_scores(features: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """1 - max_k cos(feature, prototype_k), per image: higher is further from every labelled class."""
    return 1.0 - (F.normalize(features.float(), dim=1) @ prototypes.float().T).max(dim=1).values


def unknown_threshold(inside_scores: torch.Tensor, false_unknown: float = FALSE_UNKNOWN) -> float:
    """The score that a share ``false_unknown`` of images inside the label set reach (their 1 - q quantile)."""
    if inside_scores.numel() == 0:
        raise ValueError("no image to calibrate the outlier threshold on")
    return float(torch.quantile(inside_scores.float(), 1.0 - false_unknown))
