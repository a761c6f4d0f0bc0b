"""The FixMatch loss (Sohn et al. 2020) as a pure function."""
from __future__ import annotations

from typing import Optional

import torch

from distssl.ssl.algorithm import ThresholdRule


def fixmatch_loss(logits_x: torch.Tensor, targets_x: torch.Tensor, logits_strong: torch.Tensor,
                  probs_weak: torch.Tensor, *, tau: float, lambda_u: float,
                  true_u: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, dict[str, float]]:
    """CE(labeled) + lambda_u * mean_u[ mask * CE(strong, argmax weak) ], mask = max weak prob >= tau:
    FixMatch's rule (ThresholdRule.rule_loss) on its own, without distribution alignment or state.

    ``probs_weak`` are the (already aligned) weak-view probabilities; they carry no gradient.
    The unlabeled term is averaged over the whole unlabeled batch, masked or not, as in the paper.
    ``true_u`` (labels of unlabeled images, -1 where unknown) only feeds the pseudo-label accuracy.
    """
    rule = FixMatch(logits_x.shape[1], tau=tau, lambda_u=lambda_u)
    return rule.rule_loss(logits_x, targets_x, logits_strong, probs_weak, true_u=true_u)


class FixMatch(ThresholdRule):
    """Sohn et al. 2020, "FixMatch": a fixed confidence threshold tau (0.95 in the paper)."""

    name = "fixmatch"

    def weights(self, probs: torch.Tensor, ids: Optional[torch.Tensor]) -> torch.Tensor:
        return (probs.max(dim=1).values >= self.tau).float()
