"""FreeMatch (Wang et al. 2023, "FreeMatch: Self-adaptive Thresholding for Semi-supervised Learning").

Self-adaptive thresholds: a global one, tau_t = EMA of the mean max confidence of the weak views, and
a per-class one, tau_t(c) = MaxNorm(p_t)(c) * tau_t with p_t the EMA of the mean weak-view
probabilities; both start at 1/C (the paper's initialisation) and move with the paper's momentum 0.999
on its 2^20-step runs, and by default with the same memory as a share of a shorter run (run_momentum). The
self-adaptive fairness loss (weight 0.01, as for the paper's CIFAR runs; USB's ``ent_loss_ratio``) is
the paper's Eq. 11 with its sign: minus the cross-entropy between p_t normalised by the EMA histogram of
weak-view predictions and the mean strong-view prediction of the masked samples normalised by their
predicted-class histogram (classes with an empty histogram drop out, as in the authors' code).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from distssl.ssl.algorithm import ThresholdRule, ema, run_momentum


def freematch_mask(probs: torch.Tensor, time_p: float, p_model: torch.Tensor) -> torch.Tensor:
    max_p, pseudo = probs.max(dim=1)
    class_scale = p_model / p_model.max()
    return (max_p >= time_p * class_scale.to(probs.device)[pseudo]).float()


def inverse_or_zero(h: torch.Tensor) -> torch.Tensor:
    """1 / h, with 0 where h is 0: a class never predicted drops out of its SumNorm (USB's
    ``replace_inf_to_zero``) instead of taking the whole mass."""
    return torch.where(h > 0, 1.0 / h, torch.zeros_like(h))


def fairness_loss(logits_s: torch.Tensor, mask: torch.Tensor, p_model: torch.Tensor,
                  label_hist: torch.Tensor) -> torch.Tensor:
    """The paper's Eq. 11, L_f = -H(SumNorm(p_t / h_t), SumNorm(mean p_s / hist_s)) over the masked strong
    views, H the cross-entropy: sum(target * log mean_s), negative. Minimising it raises the cross-entropy,
    i.e. pushes the masked mean prediction away from collapsing (the authors, USB issue #182: "it
    corresponds to maximizing the entropy"; USB's ``entropy_loss``)."""
    keep = mask > 0
    if not keep.any():
        return logits_s.new_zeros(())
    probs_s = logits_s[keep].softmax(dim=1)
    hist_s = torch.bincount(probs_s.argmax(dim=1), minlength=probs_s.shape[1]).to(probs_s.dtype)
    hist_s = hist_s / hist_s.sum()
    mean_s = probs_s.mean(dim=0) * inverse_or_zero(hist_s).detach()
    mean_s = mean_s / mean_s.sum()
    target = (p_model * inverse_or_zero(label_hist)).to(logits_s.device)
    target = target / target.sum()
    return (target * torch.log(mean_s + 1e-12)).sum()


@dataclass
class FreeMatchConfig:
    """Wang et al. 2023: self-adaptive global and class thresholds and the fairness loss."""
    # EMA of the confidence statistics (the paper's lambda, 0.999 for its 2^20 steps); null = the paper's
    # memory as a share of this run (distssl.ssl.algorithm.run_momentum)
    momentum: Optional[float] = None
    fairness_weight: float = 0.01  # self-adaptive fairness loss weight (the paper's CIFAR setting)

    def validate(self, check) -> None:
        check(self.momentum is None or 0.0 <= self.momentum < 1.0, "momentum", self.momentum,
              "0 <= m < 1, or null (derived from the run)")
        check(self.fairness_weight >= 0, "fairness_weight", self.fairness_weight, ">= 0")


class FreeMatch(ThresholdRule):
    name = "freematch"
    Config = FreeMatchConfig

    def __init__(self, num_classes: int, **kw):
        super().__init__(num_classes, **kw)
        self.momentum = self.own_key("momentum", lambda: run_momentum(self.shape, num_classes))
        self.fairness_weight = self.own.fairness_weight
        self.p_model = torch.full((num_classes,), 1.0 / num_classes)
        self.label_hist = torch.full((num_classes,), 1.0 / num_classes)
        self.time_p = 1.0 / num_classes

    def weights(self, probs: torch.Tensor, ids: Optional[torch.Tensor]) -> torch.Tensor:
        return freematch_mask(probs, self.time_p, self.p_model)

    def extra_loss(self, logits_s: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, dict]:
        if self.fairness_weight <= 0 or logits_s.shape[0] == 0:
            return logits_s.new_zeros(()), {}
        fair = fairness_loss(logits_s, w, self.p_model, self.label_hist)
        return self.fairness_weight * fair, {"loss_fair": fair.detach(), "threshold": self.time_p}

    def update(self, probs: torch.Tensor, ids: Optional[torch.Tensor]) -> None:
        max_p, pseudo = probs.max(dim=1)
        hist = torch.bincount(pseudo, minlength=self.num_classes).double()
        local = torch.cat([max_p.double().sum().view(1), probs.double().sum(dim=0), hist,
                           probs.new_tensor([probs.shape[0]], dtype=torch.float64)])
        total = self.global_sum(local).cpu().float()
        n = float(total[-1])
        C = self.num_classes
        self.time_p = float(ema(torch.tensor(self.time_p), total[0] / n, self.momentum))
        self.p_model = ema(self.p_model, total[1:1 + C] / n, self.momentum)
        self.label_hist = ema(self.label_hist, total[1 + C:1 + 2 * C] / n, self.momentum)

    def own_state(self) -> dict:
        return {"time_p": torch.tensor(self.time_p), "p_model": self.p_model.clone(),
                "label_hist": self.label_hist.clone()}

    def load_own_state(self, state: dict) -> None:
        self.time_p = float(state["time_p"])
        self.p_model, self.label_hist = state["p_model"].float().clone(), state["label_hist"].float().clone()
