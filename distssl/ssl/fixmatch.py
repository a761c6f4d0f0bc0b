"""The FixMatch loss (Sohn et al. 2020) as a pure function."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from distssl.ssl.algorithm import ThresholdRule


def fixmatch_loss(logits_x: torch.Tensor, targets_x: torch.Tensor, logits_strong: torch.Tensor,
                  probs_weak: torch.Tensor, *, tau: float, lambda_u: float,
                  true_u: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, dict[str, float]]:
    """CE(labeled) + lambda_u * mean_u[ mask * CE(strong, argmax weak) ], mask = max weak prob >= tau.

    ``probs_weak`` are the (already aligned) weak-view probabilities; they carry no gradient.
    The unlabeled term is averaged over the whole unlabeled batch, masked or not, as in the paper.
    ``true_u`` (labels of unlabeled images, -1 where unknown) only feeds the pseudo-label accuracy.
    """
    probs_weak = probs_weak.detach()
    loss_x = F.cross_entropy(logits_x, targets_x)
    max_p, pseudo = probs_weak.max(dim=1)
    mask = (max_p >= tau).float()
    if logits_strong.shape[0] == 0:  # no unlabeled images: a plain supervised step, not NaN
        loss_u = logits_x.new_zeros(())
    else:
        loss_u = (F.cross_entropy(logits_strong, pseudo, reduction="none") * mask).mean()
    loss = loss_x + lambda_u * loss_u
    stats = {"loss": float(loss.detach()), "loss_x": float(loss_x.detach()), "loss_u": float(loss_u.detach()),
             "mask_rate": float(mask.mean()) if mask.numel() else float("nan")}
    if true_u is not None:
        known = true_u >= 0
        correct = (pseudo == true_u) & known
        masked_known = known & mask.bool()
        stats["pseudo_acc"] = float(correct[masked_known].float().mean()) if masked_known.any() else float("nan")
        stats["pseudo_acc_all"] = float(correct[known].float().mean()) if known.any() else float("nan")
    return loss, stats


class FixMatch(ThresholdRule):
    """Sohn et al. 2020, "FixMatch": a fixed confidence threshold tau (0.95 in the paper)."""

    name = "fixmatch"

    def weights(self, probs: torch.Tensor, ids: Optional[torch.Tensor]) -> torch.Tensor:
        return (probs.max(dim=1).values >= self.tau).float()
