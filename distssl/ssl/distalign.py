"""Distribution alignment (ReMixMatch, Berthelot et al. 2020).

Weak-view probabilities are multiplied by p_target / p_model and renormalised. p_model is a
running mean of the model's weak-view predictions on unlabeled data; the batch mean is all-reduced
across ranks every step (sum of probabilities and count), so every rank holds the same p_model and
2 ranks reproduce the 1-rank value on the same global batch.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from distssl.distributed.collectives import sum_over_ranks
from distssl.ssl.imbalance import em_prior_step


def align(probs: torch.Tensor, p_model: torch.Tensor, p_target: torch.Tensor) -> torch.Tensor:
    """probs x (1e-6 + p_target) / (1e-6 + p_model), renormalised: the reference's ratio (ReMixMatch's code,
    and USB's DistAlignEMAHook), which a class the model never predicts cannot blow up."""
    aligned = probs * ((p_target + 1e-6) / (p_model + 1e-6))
    return aligned / aligned.sum(dim=1, keepdim=True)


def update_running_mean(p_model: Optional[torch.Tensor], batch_mean: torch.Tensor, momentum: float) -> torch.Tensor:
    """The first batch sets p_model; later ones move it by (1 - momentum)."""
    if p_model is None:
        return batch_mean.clone()
    return momentum * p_model + (1 - momentum) * batch_mean


def target_from_histogram(histogram: list[int] | torch.Tensor) -> torch.Tensor:
    h = torch.as_tensor(histogram, dtype=torch.float64)
    if h.numel() == 0 or float(h.sum()) <= 0:
        raise ValueError("the labeled class histogram is empty: cannot use dist_align_target=labeled")
    h = h.clamp_min(1e-3)  # a class with no labels must not zero its probability
    return (h / h.sum()).float()


class DistributionAlignment:
    """Holds p_model (identical on every rank) and p_target; saved in checkpoints."""

    def __init__(self, num_classes: int, momentum: float = 0.999, p_target: Optional[torch.Tensor] = None,
                 reduce: Callable[[torch.Tensor], torch.Tensor] = sum_over_ranks,
                 train_prior: Optional[torch.Tensor] = None):
        """``train_prior`` (the labeled set's class shares): p_target is estimated, the unlabeled set's class
        mix as one EM step a batch (Saerens et al. 2002) moves it, with the same momentum, from ``train_prior``."""
        self.num_classes, self.momentum, self.reduce = num_classes, momentum, reduce
        self.train_prior = None if train_prior is None else train_prior.float()
        start = p_target if p_target is not None else self.train_prior
        self.p_target = (start if start is not None else torch.full((num_classes,), 1.0 / num_classes)).float()
        self.p_model: Optional[torch.Tensor] = None

    @torch.no_grad()
    def __call__(self, probs: torch.Tensor) -> torch.Tensor:
        """Update p_model with this global batch, then align ``probs`` (ReMixMatch's order)."""
        self.update(probs)
        return self.align_with_current(probs)

    @torch.no_grad()
    def update(self, probs: torch.Tensor) -> None:
        """Move p_model by the mean of ``probs`` over all ranks (one call per global batch)."""
        parts = [probs.double().sum(dim=0)]
        if self.train_prior is not None:  # the EM step's reweighted posteriors, summed in the same reduction
            parts.append(em_prior_step(probs, self.p_target, self.train_prior).double() * probs.shape[0]
                         if probs.shape[0] else probs.new_zeros(self.num_classes, dtype=torch.float64))
        local = torch.cat(parts + [probs.new_tensor([probs.shape[0]], dtype=torch.float64)])
        total = self.reduce(local)
        k = self.num_classes
        batch_mean = (total[:k] / total[-1]).float().cpu()
        self.p_model = update_running_mean(self.p_model, batch_mean, self.momentum)
        if self.train_prior is not None and total[-1] > 0:
            estimate = (total[k:2 * k] / total[-1]).float().cpu()
            self.p_target = self.momentum * self.p_target + (1 - self.momentum) * estimate

    @torch.no_grad()
    def align_with_current(self, probs: torch.Tensor) -> torch.Tensor:
        """Align with p_model as it stands (before any p_model exists: unchanged). Lets a step that
        sees its unlabeled batch in several micro-batches align each one and update p_model once."""
        if self.p_model is None:
            return probs
        return align(probs, self.p_model.to(probs.device), self.p_target.to(probs.device))

    def state_dict(self) -> dict:
        return {"p_model": None if self.p_model is None else self.p_model.clone(),
                "p_target": self.p_target.clone(), "momentum": self.momentum}

    def load_state_dict(self, state: dict) -> None:
        self.p_model = None if state["p_model"] is None else state["p_model"].float()
        self.p_target = state["p_target"].float()
