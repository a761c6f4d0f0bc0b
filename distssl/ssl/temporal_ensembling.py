"""Temporal Ensembling (Laine & Aila 2017, "Temporal Ensembling for Semi-Supervised Learning", 2.2).

Each unlabeled sample's target is its own ensemble of past predictions, Z <- alpha Z + (1 - alpha) z
(z the softmax of this epoch's prediction of the sample: by default of its weak view, see below),
with the start-up bias corrected: target = Z / (1 - alpha^t), t the number of times this sample has
been predicted (the paper counts epochs; on a stream, a sample is predicted once an epoch). The
consistency term is the mean squared difference between the softmax output and the target, weighted
by weight * exp(-5 (1 - T)^2) over the first ``rampup`` fraction of train.steps; samples with no
prediction yet have no target and add nothing.

The ensemble is per-sample state over the whole unlabeled set, the same on every rank, kept compact
so it fits at ImageNet scale: per sample, the ``top_k`` largest entries of Z (fp16 values, int16
class numbers) and t (int32), 4 * top_k + 4 bytes (169 MB for 1.28M images at top_k 32, against 5.1 GB
for the full fp32 matrix at 1,000 classes). The mass Z leaves outside its top k is known exactly,
(1 - alpha^t) minus what is kept, and is spread evenly over the other classes; with top_k >= the
number of classes the ensemble is exact. Each rank computes the new top k of its own samples and the
ranks all-gather (id, values, classes), so the update does not depend on the world size and the
traffic is O(batch * top_k), not O(batch * classes).

Defaults: alpha 0.6 (the paper); weight 30, the paper's w_max for Temporal Ensembling. The paper also
scales w_max by M/N, the labeled fraction, but its labeled term is summed over the labeled images
of a mixed minibatch and divided by the whole minibatch, which scales it by M/N as well; here the
labeled term is a mean over the labeled batch, so the same balance is w_max itself. Ramp-up over 0.4
of the run (USB's unsup_warm_up for the ramped methods), top_k 32. The view trained is the strong one
(RandAugment + Cutout; ``augment=weak`` is the paper's flip and translation), and the ensemble is
made of the weak view's predictions, forwarded without gradient (``ensemble=weak``: one more
forward per image than the paper's, which ensembles the trained view's own predictions,
``ensemble=trained``). On the demo (2 ranks, 400 steps) the strong view's own predictions made
targets too poor to gain from (71.5 and 70.4 at weights 3 and 30, against supervised 75.6); the weak
view's gained 8 and 14 points (docs/benchmarks.md).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from distssl.ssl.algorithm import Consistency, RampedConfig, StepNeeds, second_view


def dense_ensemble(values: torch.Tensor, classes: torch.Tensor, count: torch.Tensor, alpha: float,
                   num_classes: int) -> torch.Tensor:
    """Z of each row, from its top-k entries, with the mass outside them spread over the other classes."""
    n, k = values.shape
    z = torch.zeros(n, num_classes, dtype=torch.float32, device=values.device)
    z.scatter_(1, classes.long(), values.float())
    if k < num_classes:
        total = 1.0 - alpha ** count.double()  # what Z sums to after `count` updates from probabilities
        tail = (total.float() - z.sum(dim=1)).clamp_min(0.0) / (num_classes - k)
        others = torch.ones_like(z).scatter_(1, classes.long(), 0.0)
        z = z + tail[:, None] * others * (count[:, None] > 0)
    return z


def updated_top_k(values: torch.Tensor, classes: torch.Tensor, count: torch.Tensor, probs: torch.Tensor,
                  alpha: float, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-k entries of alpha Z + (1 - alpha) z for each row."""
    z = alpha * dense_ensemble(values, classes, count, alpha, probs.shape[1]) + (1 - alpha) * probs.float()
    top = z.topk(k, dim=1)
    return top.values, top.indices


def targets(values: torch.Tensor, classes: torch.Tensor, count: torch.Tensor, alpha: float,
            num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(bias-corrected targets, whether each row has one)."""
    z = dense_ensemble(values, classes, count, alpha, num_classes)
    known = count > 0
    correction = (1.0 - alpha ** count.double()).clamp_min(1e-12).float()
    return z / correction[:, None], known


@dataclass
class TemporalEnsemblingConfig(RampedConfig):
    """Laine & Aila 2017: each sample's target is the bias-corrected EMA of its past predictions."""
    momentum: float = 0.6  # the ensemble's alpha (the paper's)
    weight: float = 30.0  # consistency weight w_max (the paper's for Temporal Ensembling; see the module's note)
    # classes kept per sample (4 * top_k + 4 bytes a sample, on every rank); <= 0 or >= classes: exact
    top_k: int = 32
    # the view trained with gradient: another weak one (the paper's), or the strong one (RandAugment + Cutout)
    augment: Literal["weak", "strong"] = "strong"
    # whose predictions the ensemble accumulates: the trained view's own (the paper's: one forward per
    # image), or the weak view's, forwarded without gradient (one more forward, as FixMatch's pseudo-labels)
    ensemble: Literal["trained", "weak"] = "weak"

    def validate(self, check) -> None:
        super().validate(check)
        check(0.0 <= self.momentum < 1.0, "momentum", self.momentum, "0 <= m < 1")


class TemporalEnsembling(Consistency):
    name = "temporal_ensembling"
    Config = TemporalEnsemblingConfig
    NEEDS = StepNeeds(views=("weak", "strong"), with_grad=("strong",), no_grad=("weak",))  # the default
    needs_ids = True

    def __init__(self, num_classes: int, **kw):
        super().__init__(num_classes, **kw)
        self.view = "strong" if second_view(self.own.augment) == "strong" else "weak"
        self.source = "weak" if self.own.ensemble == "weak" else self.view  # the view the ensemble is made of
        if self.source == self.view:
            self.needs = StepNeeds(views=(self.view,), with_grad=(self.view,), no_grad=())
        else:
            self.needs = StepNeeds(views=(self.source, self.view), with_grad=(self.view,), no_grad=(self.source,))
        self.alpha = self.own.momentum
        top_k = self.own.top_k
        self.k = num_classes if top_k <= 0 else min(top_k, num_classes)
        n = self.num_unlabeled
        self.values = torch.zeros(n, self.k, dtype=torch.float16)
        self.classes = torch.zeros(n, self.k, dtype=torch.int16 if num_classes < 2 ** 15 else torch.int32)
        self.count = torch.zeros(n, dtype=torch.int32)
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._device = torch.device("cpu")  # where the collectives run (nccl gathers only GPU tensors)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        return ids.cpu().long() % self.num_unlabeled  # ids past the set's count (gaps in keys) wrap

    def consistency(self, fw):
        logits = fw.logits_u[self.view]
        rows = self.rows(fw.ids)
        target, known = targets(self.values[rows], self.classes[rows], self.count[rows], self.alpha,
                                self.num_classes)
        target, known = target.to(logits.device), known.to(logits.device)
        probs = logits.softmax(dim=1)
        per_sample = ((probs - target) ** 2).mean(dim=1) * known
        made_of = probs if self.source == self.view else fw.logits_u[self.source].softmax(dim=1)
        self._pending.append((rows, made_of.detach().float().cpu()))
        self._device = logits.device
        guessed = torch.where(known, target.argmax(dim=1), probs.detach().argmax(dim=1))
        return per_sample.mean(), logits.new_zeros(()), guessed, {"target_rate": known.float().mean()}

    @torch.no_grad()
    def end_step(self) -> None:
        if not self._pending:
            return
        rows = torch.cat([r for r, _ in self._pending])
        probs = torch.cat([p for _, p in self._pending])
        self._pending = []
        values, classes = updated_top_k(self.values[rows], self.classes[rows], self.count[rows], probs,
                                        self.alpha, self.k)
        # every rank's (row, top-k values, top-k classes) of this step, in rank order
        packed = torch.cat([rows[:, None].double(), values.double(), classes.double()], dim=1)
        packed = self.gather(packed.to(self._device)).cpu()
        rows_all = packed[:, 0].long()
        self.values[rows_all] = packed[:, 1:1 + self.k].to(torch.float16)
        self.classes[rows_all] = packed[:, 1 + self.k:].to(self.classes.dtype)
        self.count[rows_all.unique()] += 1  # a sample twice in one step (a set smaller than the batch) counts once

    def own_state(self) -> dict:
        return {"values": self.values.clone(), "classes": self.classes.clone(), "count": self.count.clone()}

    def load_own_state(self, state: dict) -> None:
        if tuple(state["values"].shape) != tuple(self.values.shape):
            raise ValueError(f"data.unlabeled: the saved ensemble is {tuple(state['values'].shape)} (samples x top_k), "
                             f"this run's "
                             f"{tuple(self.values.shape)}: resume with the same data.unlabeled and "
                             f"ssl.temporal_ensembling.top_k")
        self.values = state["values"].to(torch.float16).clone()
        self.classes = state["classes"].to(self.classes.dtype).clone()
        self.count = state["count"].to(torch.int32).clone()
