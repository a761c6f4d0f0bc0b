"""SoftMatch (Chen et al. 2023, "SoftMatch: Addressing the Quantity-Quality Trade-off in
Semi-supervised Learning").

Every pseudo-label counts, weighted by a truncated Gaussian of its confidence: weight 1 at or above
mu_t, exp(-(max p - mu_t)^2 / (2 sigma_t^2 / n_sigma^2)) below it, with mu_t and sigma_t^2 the EMAs
(momentum 0.999 on the paper's 2^20 steps, by default the same memory as a share of a shorter run:
run_momentum) of the mean and the unbiased variance of the weak views' max confidence over the global
batch, starting at 1/C and 1. Uniform alignment (UA) is distribution alignment towards the
uniform distribution: ``ssl.dist_align=true`` with ``dist_align_target=uniform`` (the paper's
setting); it shapes the weights alone, the pseudo-labels stay the argmax of the raw prediction (the
authors' code: "do not use aligned probs for generating pseudo labels"). Defaults from the paper and USB's
configs: n_sigma 2; the momentum as said above.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from distssl.ssl.algorithm import ThresholdRule, ema, run_momentum


def soft_weights(max_p: torch.Tensor, mu: float, var: float, n_sigma: float) -> torch.Tensor:
    below = torch.clamp(max_p - mu, max=0.0)
    return torch.exp(-(below ** 2) / (2 * var / n_sigma ** 2))


@dataclass
class SoftMatchConfig:
    """Chen et al. 2023: truncated-Gaussian weights from the EMA mean/variance of the confidence."""
    # EMA of the confidence mean and variance (0.999 in the paper, for its 2^20 steps); null = the paper's
    # memory as a share of this run (distssl.ssl.algorithm.run_momentum)
    momentum: Optional[float] = None
    n_sigma: float = 2.0  # the Gaussian's width in standard deviations (the paper's default)

    def validate(self, check) -> None:
        check(self.momentum is None or 0.0 <= self.momentum < 1.0, "momentum", self.momentum,
              "0 <= m < 1, or null (derived from the run)")
        check(self.n_sigma > 0, "n_sigma", self.n_sigma, "> 0")


class SoftMatch(ThresholdRule):
    name = "softmatch"
    Config = SoftMatchConfig
    labels_from_aligned = False

    def __init__(self, num_classes: int, **kw):
        super().__init__(num_classes, **kw)
        self.momentum = self.own_key("momentum", lambda: run_momentum(self.shape, num_classes))
        self.n_sigma = self.own.n_sigma
        self.mu, self.var = 1.0 / num_classes, 1.0

    def weights(self, probs: torch.Tensor, ids: Optional[torch.Tensor]) -> torch.Tensor:
        return soft_weights(probs.max(dim=1).values, self.mu, self.var, self.n_sigma)

    def update(self, probs: torch.Tensor, ids: Optional[torch.Tensor]) -> None:
        max_p = probs.max(dim=1).values.double()
        total = self.global_sum(torch.stack([max_p.sum(), (max_p ** 2).sum(), max_p.new_tensor(max_p.numel())]))
        s, s2, n = (float(x) for x in total.double())
        mean = s / n
        var = (s2 - n * mean * mean) / max(1.0, n - 1)  # unbiased, as torch.var
        self.mu = float(ema(torch.tensor(self.mu), torch.tensor(mean), self.momentum))
        self.var = float(ema(torch.tensor(self.var), torch.tensor(var), self.momentum))

    def own_state(self) -> dict:
        return {"mu": torch.tensor(self.mu), "var": torch.tensor(self.var)}

    def load_own_state(self, state: dict) -> None:
        self.mu, self.var = float(state["mu"]), float(state["var"])
