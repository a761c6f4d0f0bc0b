"""Open-set training: IOMatch (Li et al., ICCV 2023, "IOMatch: Simplifying Open-Set Semi-Supervised Learning
with Joint Inliers and Outliers Utilization"), as a component any pseudo-label rule can use (``ssl.open_set``).

A bucket holds images of none of the labelled classes. IOMatch keeps two heads beside the classifier, on a
projection of the pooled features (an MLP, features -> features -> 128):

- one-vs-all classifiers (2K outputs, viewed as (2, K): per class, "outside it" / "inside it"), trained on the
  labelled batch only: -log p_in(y) plus the largest -log p_out(k) over the other classes (OpenMatch's loss);
- an open-set classifier of K + 1 classes, trained on the strong view towards the weak view's open-set target
  q = (p_k * p_in(k) for each k, sum_k p_k * p_out(k)), where q's largest entry reaches 0.5.

The weak view's outlier score is sum_k p_k * p_out(k) (p: the rule's aligned probabilities); a sample whose score
reaches 0.5 is kept out of the rule's pseudo-label loss. Instead of being dropped, the images that look unknown
train the (K+1)-th class. The open-set loss is off for the run's first 1/256 (the authors' first epoch of 256).

At prediction an export scores images by their distance to the labelled class prototypes instead
(distssl.outliers: the one-vs-all head, trained on the labelled images alone, separates few-label classes'
outliers poorly); an export without prototypes uses this score, from the calibrated class probabilities, and
names ``unknown`` an image whose score reaches 0.5.

Departures from the authors' code (docs/algorithms.md): the rule's own pseudo-labels train the classifier (hard
labels for FixMatch, where IOMatch's soft CE on its 0.95-confident, aligned probabilities is nearly the same),
and the rule's ``ssl.dist_align`` settings apply (IOMatch: a 128-batch queue towards uniform).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class IOMatchConfig:
    """ssl.iomatch: IOMatch's keys (used when ssl.open_set=iomatch); defaults: the authors' code."""
    q_cutoff: float = 0.5  # the open-set target's largest entry must reach this
    lambda_ova: float = 1.0  # weight of the one-vs-all loss on the labelled batch (their mb_loss_ratio)
    lambda_open: float = 1.0  # weight of the open-set loss (their op_loss_ratio)
    projection: int = 128  # width of the projection both heads read
    warmup: float = 1 / 256  # share of the run without the open-set loss (their first epoch of 256)
    # OpenMatch's (Saito et al. 2021) entropy minimisation of the unlabeled one-vs-all outputs (their 0.1); 0: off,
    # as in IOMatch
    lambda_em: float = 0.0
    # OpenMatch's soft open-set consistency between the weak and strong view's one-vs-all outputs (their 0.5)
    lambda_socr: float = 0.0
    # the one-vs-all loss also on the unlabeled images the rule trains on (confident, inlier), their pseudo-label as
    # the class, on the strong view (SSB's pseudo-inliers, Fan et al. 2023); 0: IOMatch's labelled batch only
    pseudo_inliers: float = 0.0

    def validate(self, check) -> None:
        check(0.0 <= self.q_cutoff <= 1.0, "q_cutoff", self.q_cutoff, "0..1")
        check(self.lambda_ova >= 0, "lambda_ova", self.lambda_ova, ">= 0")
        check(self.lambda_open >= 0, "lambda_open", self.lambda_open, ">= 0")
        check(self.projection >= 1, "projection", self.projection, ">= 1")
        check(0.0 <= self.warmup < 1.0, "warmup", self.warmup, "0 <= warmup < 1")
        check(self.lambda_em >= 0, "lambda_em", self.lambda_em, ">= 0")
        check(self.lambda_socr >= 0, "lambda_socr", self.lambda_socr, ">= 0")
        check(self.pseudo_inliers >= 0, "pseudo_inliers", self.pseudo_inliers, ">= 0")


OUTLIER_AT = 0.5  # IOMatch's rule: an outlier score of at least 0.5 is outside the label set


class OpenSetHead(nn.Module):
    """The projection and IOMatch's two heads on it; forward gives [one-vs-all (2K) | open-set (K + 1)]."""

    def __init__(self, features: int, num_classes: int, projection: int = 128):
        super().__init__()
        self.num_classes = num_classes
        self.projection = nn.Sequential(nn.Linear(features, features), nn.ReLU(), nn.Linear(features, projection))
        self.one_vs_all = nn.Linear(projection, 2 * num_classes, bias=False)
        self.open_set = nn.Linear(projection, num_classes + 1)
        nn.init.xavier_normal_(self.one_vs_all.weight)
        nn.init.xavier_normal_(self.open_set.weight)
        nn.init.zeros_(self.open_set.bias)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        z = self.projection(pooled)
        return torch.cat([self.one_vs_all(z), self.open_set(z)], dim=1)


def split_outputs(out: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """An OpenSetHead's output -> (one-vs-all logits (n, 2K), open-set logits (n, K + 1))."""
    return out[:, : 2 * num_classes], out[:, 2 * num_classes:]


def one_vs_all_probs(logits_ova: torch.Tensor) -> torch.Tensor:
    """(n, 2K) -> (n, 2, K): softmax over the pair; [:, 0] outside class k, [:, 1] inside it."""
    n = logits_ova.shape[0]
    return F.softmax(logits_ova.view(n, 2, -1), dim=1)


def one_vs_all_loss(logits_ova: torch.Tensor, labels: torch.Tensor, weights=None) -> torch.Tensor:
    """OpenMatch's one-vs-all loss of a labelled batch: mean of -log p_in(y), plus the mean over samples of the
    largest -log p_out(k) over the classes k other than y. ``weights``: per sample, averaged over the batch
    (pseudo-labelled samples, ``ssl.iomatch.pseudo_inliers``)."""
    p = one_vs_all_probs(logits_ova)
    positive = F.one_hot(labels, p.shape[2]).float()
    inside = (-torch.log(p[:, 1, :] + 1e-8) * positive).sum(dim=1)
    outside = (-torch.log(p[:, 0, :] + 1e-8) * (1 - positive)).max(dim=1).values
    if weights is None:
        return inside.mean() + outside.mean()
    return ((inside + outside) * weights).mean()


def outlier_scores(probs: torch.Tensor, logits_ova: torch.Tensor) -> torch.Tensor:
    """sum_k p_k * p_out(k): how likely each sample is outside the label set, for class probabilities ``probs``."""
    return (probs * one_vs_all_probs(logits_ova)[:, 0, :]).sum(dim=1)


def open_set_targets(probs: torch.Tensor, logits_ova: torch.Tensor) -> torch.Tensor:
    """IOMatch's (K + 1)-way target: p_k * p_in(k) for the known classes, sum_k p_k * p_out(k) for "unknown"."""
    r = one_vs_all_probs(logits_ova)
    return torch.cat([probs * r[:, 1, :], (probs * r[:, 0, :]).sum(dim=1, keepdim=True)], dim=1)


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per sample: -sum_k targets_k log softmax(logits)_k."""
    return -(targets * F.log_softmax(logits, dim=1)).sum(dim=1)


def one_vs_all_entropy(logits_ova: torch.Tensor) -> torch.Tensor:
    """OpenMatch's entropy minimisation: the mean over samples and classes of each pair's entropy."""
    p = one_vs_all_probs(logits_ova)
    return (-(p * torch.log(p + 1e-8)).sum(dim=1)).mean(dim=1).mean()


def one_vs_all_consistency(logits_a: torch.Tensor, logits_b: torch.Tensor) -> torch.Tensor:
    """OpenMatch's soft open-set consistency (SOCR): per sample the squared distance of the two views' pair
    probabilities, summed over pairs and classes, averaged over samples."""
    pa, pb = one_vs_all_probs(logits_a), one_vs_all_probs(logits_b)
    return ((pa - pb).abs() ** 2).sum(dim=1).sum(dim=1).mean()
