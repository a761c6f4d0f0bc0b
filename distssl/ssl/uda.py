"""UDA (Xie et al. 2020, "Unsupervised Data Augmentation for Consistency Training").

The weak view's prediction, sharpened with temperature T and kept where its confidence reaches
``threshold``, is the soft target of the strong view: CE(strong, sharpened weak) averaged over the
whole unlabeled batch (the paper's KL divergence up to the target's entropy, which carries no
gradient). Training-signal annealing (TSA) leaves out of the labeled loss the samples whose correct
class the model already gives a probability above eta_t = alpha_t (1 - 1/C) + 1/C, alpha_t rising with
the fraction t of train.steps done (linear: t, log: 1 - exp(-5t), exp: exp(5(t - 1))), so that the few
labels are not memorised before the unlabeled loss has taught anything; the kept samples' loss is
averaged over the kept ones (the paper's code). Distribution alignment (ssl.dist_align) aligns the
weak probabilities before sharpening. Defaults: T 0.4, threshold 0.8, lambda_u 1 and TSA off (USB's
UDA settings; the paper uses TSA for its smallest label sets).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from distssl.ssl.algorithm import StepNeeds, ThresholdRule


def sharpen(probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """p^(1/T), renormalised: T < 1 moves mass to the likeliest classes."""
    p = probs.clamp_min(1e-12) ** (1.0 / temperature)
    return p / p.sum(dim=1, keepdim=True)


def tsa_threshold(schedule: str, progress: float, num_classes: int) -> float:
    """eta_t of training-signal annealing; 1 (nothing left out) for schedule "none"."""
    t = min(1.0, max(0.0, progress))
    alpha = {"linear": lambda: t, "log": lambda: 1 - math.exp(-5 * t),
             "exp": lambda: math.exp(5 * (t - 1)), "none": lambda: 1.0}[schedule]()
    return alpha * (1 - 1 / num_classes) + 1 / num_classes


@dataclass
class UDAConfig:
    """Xie et al. 2020: sharpened soft targets from the weak view, a confidence mask, TSA."""
    temperature: float = 0.4  # sharpening of the weak view's prediction (USB's UDA setting)
    threshold: float = 0.8  # confidence a weak prediction needs to be a target (USB's UDA setting; not ssl.tau)
    # training-signal annealing of the labeled loss: none, or the paper's linear / log / exp schedules
    tsa: Literal["none", "linear", "log", "exp"] = "none"

    def validate(self, check) -> None:
        check(self.temperature > 0, "temperature", self.temperature, "> 0")
        check(0.0 <= self.threshold <= 1.0, "threshold", self.threshold, "0 <= threshold <= 1")


class UDA(ThresholdRule):
    name = "uda"
    Config = UDAConfig
    NEEDS = StepNeeds(views=("weak", "strong"), with_grad=("strong",), no_grad=("weak",))

    def __init__(self, num_classes: int, **kw):
        super().__init__(num_classes, **kw)
        self.temperature, self.threshold, self.tsa = self.own.temperature, self.own.threshold, self.own.tsa

    def weights(self, probs, ids):
        return (probs.max(dim=1).values >= self.threshold).float()

    def unlabeled_loss(self, logits_s, probs, w):
        target = sharpen(probs, self.temperature)
        return (-(target * F.log_softmax(logits_s, dim=1)).sum(dim=1) * w).mean()

    def labeled_loss(self, logits_x, targets_x, step, total_steps):
        eta = tsa_threshold(self.tsa, step / max(1, total_steps), self.num_classes)
        per_sample = F.cross_entropy(logits_x, targets_x, reduction="none")
        if self.tsa == "none":
            return per_sample.mean(), {}
        p_correct = logits_x.detach().softmax(dim=1).gather(1, targets_x[:, None]).squeeze(1)
        keep = (p_correct <= eta).float()
        return (per_sample * keep).sum() / keep.sum().clamp_min(1.0), {"tsa_threshold": eta,
                                                                      "tsa_kept": keep.mean()}
