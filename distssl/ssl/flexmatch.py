"""FlexMatch (Zhang et al. 2021, "FlexMatch: Boosting Semi-Supervised Learning with Curriculum Pseudo
Labeling"): a per-class threshold that follows how well each class is being learned.

Each unlabeled sample's *learning status* is the class its weak view was last predicted with a
confidence >= tau (or none). sigma(c) = samples whose status is c; beta(c) = sigma(c) / max(max_c
sigma, unused) with the paper's threshold warm-up (``unused`` = samples with no status yet, so early
on every beta is small), or / max_c sigma without it; the threshold of class c is
tau * M(beta(c)) with the convex mapping M(x) = x / (2 - x) (the paper's default). Defaults from the
paper and USB's configs: tau 0.95; the warm-up on for runs of at least WARMUP_MIN_EPOCHS epochs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from distssl.ssl.algorithm import ThresholdRule


def flex_thresholds(status: torch.Tensor, num_classes: int, tau: float, warmup: bool) -> torch.Tensor:
    """Per-class thresholds from the per-sample learning status (-1 = none yet)."""
    sigma = torch.bincount(status[status >= 0], minlength=num_classes).float()
    unused = float((status < 0).sum())
    denominator = max(float(sigma.max()), unused) if warmup else float(sigma.max())
    beta = sigma / denominator if denominator > 0 else torch.zeros_like(sigma)
    return tau * beta / (2.0 - beta)


# The warm-up lasts until most unlabeled images have passed tau once, some epochs; under 5% of a run, as in
# the paper's 9,400-epoch run, needs a run of this many epochs. A shorter run spends a large share of itself
# with every class at a near-zero threshold (the demo's 9 epochs: pseudo-labels 54% right get full weight).
WARMUP_MIN_EPOCHS = 100


@dataclass
class FlexMatchConfig:
    """Zhang et al. 2021: per-class thresholds tau * M(beta(c)), M(x) = x / (2 - x)."""
    # the paper's threshold warm-up (classes start from a low threshold while most images are unused); null =
    # on when the run reads its unlabeled set at least 100 times (the paper's read it 9,400)
    warmup: Optional[bool] = None

    def validate(self, check) -> None:
        pass


class FlexMatch(ThresholdRule):
    name = "flexmatch"
    Config = FlexMatchConfig
    needs_ids = True

    def __init__(self, num_classes: int, **kw):
        super().__init__(num_classes, **kw)
        self.warmup = self.own_key("warmup", lambda: self.shape.epochs is None or
                                   self.shape.epochs >= WARMUP_MIN_EPOCHS)
        self.status = torch.full((self.num_unlabeled,), -1, dtype=torch.long)
        self.thresholds = flex_thresholds(self.status, num_classes, self.tau, self.warmup)

    def weights(self, probs: torch.Tensor, ids: Optional[torch.Tensor]) -> torch.Tensor:
        max_p, pseudo = probs.max(dim=1)
        return (max_p >= self.thresholds.to(probs.device)[pseudo]).float()

    def update(self, probs: torch.Tensor, ids: Optional[torch.Tensor]) -> None:
        max_p, pseudo = probs.max(dim=1)
        confident = (max_p >= self.tau).long()
        # every rank's (id, class, confident) of this step, in rank order: the same status everywhere
        rows = self.gather(torch.stack([ids.to(max_p.device).long(), pseudo, confident], dim=1)).cpu()
        ids_all = rows[:, 0] % self.num_unlabeled  # ids past the set's count (gaps in keys) wrap
        keep = rows[:, 2] > 0
        self.status[ids_all[keep]] = rows[keep, 1]
        self.thresholds = flex_thresholds(self.status, self.num_classes, self.tau, self.warmup)

    def own_state(self) -> dict:
        return {"status": self.status.clone()}

    def load_own_state(self, state: dict) -> None:
        self.status = state["status"].long().clone()
        self.thresholds = flex_thresholds(self.status, self.num_classes, self.tau, self.warmup)
