"""The seam every SSL algorithm implements, and the parts they share.

The engine forwards the views (``shared_bn`` or ``concat``, the same for every algorithm) and hands
the algorithm, per micro-batch, the labeled logits and labels, the strong-view logits and the
weak-view probabilities (with each unlabeled sample's stable id); the algorithm returns the loss and
its stats. Once per optimizer step :meth:`Algorithm.end_step` updates the algorithm's state from the
whole global batch (all-reduced or all-gathered over ranks), so the state is the same on every rank
and does not depend on the world size or on gradient accumulation; masks and weights within a step
use the state as of the step's start (as distribution alignment always has here). The state is
saved in and restored from the checkpoint through :meth:`state_dict` / :meth:`load_state_dict`.

What differs between algorithms is two small functions: the per-sample weight of the unlabeled loss
(:meth:`weights`: FixMatch's fixed-threshold mask, FlexMatch's and FreeMatch's adaptive thresholds,
SoftMatch's truncated Gaussian) and the state update (:meth:`update`). Everything else (pseudo-labels,
the cross-entropies, distribution alignment as a component, stats, all-reduces) is written once, here.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from distssl.ssl.distalign import DistributionAlignment, all_reduce_sum


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Every rank's ``t`` (same shape on each), concatenated in rank order."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


class Algorithm:
    """FixMatch's loss structure: CE(labeled) + lambda_u * mean_u[ w * CE(strong, argmax weak) ]."""

    name = "base"
    needs_ids = False  # per-sample state (FlexMatch): the stream must give each unlabeled sample its id

    def __init__(self, num_classes: int, *, tau: float, lambda_u: float,
                 da: Optional[DistributionAlignment] = None, num_unlabeled: Optional[int] = None,
                 reduce: Callable[[torch.Tensor], torch.Tensor] = all_reduce_sum,
                 gather: Callable[[torch.Tensor], torch.Tensor] = all_gather_cat):
        self.num_classes, self.tau, self.lambda_u = num_classes, tau, lambda_u
        self.da, self.num_unlabeled, self.reduce, self.gather = da, num_unlabeled, reduce, gather
        self._raw, self._probs, self._ids = [], [], []

    # -- what an algorithm defines --
    def weights(self, probs: torch.Tensor, ids: Optional[torch.Tensor]) -> torch.Tensor:
        """Per-sample weight of the unlabeled loss (a 0/1 mask for threshold rules), from the state
        as it stands."""
        raise NotImplementedError

    def update(self, probs: torch.Tensor, ids: Optional[torch.Tensor]) -> None:
        """Update the state from this step's weak-view probabilities of every rank (``probs`` and
        ``ids`` are already gathered or are to be reduced by the algorithm with ``self.reduce``)."""

    def extra_loss(self, logits_s: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, dict]:
        return logits_s.new_zeros(()), {}

    def own_state(self) -> dict:
        return {}

    def load_own_state(self, state: dict) -> None:
        pass

    # -- the shared part --
    def loss(self, logits_x: torch.Tensor, targets_x: torch.Tensor, logits_s: torch.Tensor, probs_w: torch.Tensor,
             ids: Optional[torch.Tensor] = None, true_u: Optional[torch.Tensor] = None
             ) -> tuple[torch.Tensor, dict[str, float]]:
        probs_w = probs_w.detach()
        probs = self.da.align_with_current(probs_w) if self.da is not None else probs_w
        self._raw.append(probs_w)
        self._probs.append(probs)
        if ids is not None:
            self._ids.append(ids)
        loss_x = F.cross_entropy(logits_x, targets_x)
        pseudo = probs.argmax(dim=1)
        w = self.weights(probs, ids) if probs.shape[0] else probs.new_zeros(0)
        if logits_s.shape[0] == 0:  # no unlabeled images: a plain supervised step, not NaN
            loss_u = logits_x.new_zeros(())
        else:  # averaged over the whole unlabeled batch, masked or not, as in the papers
            loss_u = (F.cross_entropy(logits_s, pseudo, reduction="none") * w).mean()
        extra, extra_stats = self.extra_loss(logits_s, w)
        loss = loss_x + self.lambda_u * loss_u + extra
        stats = {"loss": float(loss.detach()), "loss_x": float(loss_x.detach()), "loss_u": float(loss_u.detach()),
                 "mask_rate": float((w > 0).float().mean()) if w.numel() else float("nan"),
                 "weight_mean": float(w.mean()) if w.numel() else float("nan"), **extra_stats}
        if true_u is not None:
            known = true_u >= 0
            correct = (pseudo == true_u) & known
            masked_known = known & (w > 0)
            stats["pseudo_acc"] = float(correct[masked_known].float().mean()) if masked_known.any() else float("nan")
            stats["pseudo_acc_all"] = float(correct[known].float().mean()) if known.any() else float("nan")
        return loss, stats

    @torch.no_grad()
    def end_step(self) -> None:
        """Once per optimizer step, on every rank: DA's p_model and the algorithm's state move with
        the global batch."""
        if not self._raw:
            return
        raw, probs = torch.cat(self._raw), torch.cat(self._probs)
        ids = torch.cat(self._ids) if self._ids else None
        self._raw, self._probs, self._ids = [], [], []
        if self.da is not None:
            self.da.update(raw)
        self.update(probs, ids)

    def state_dict(self) -> dict:
        return {"algorithm": self.name, "da": self.da.state_dict() if self.da is not None else None,
                **self.own_state()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("algorithm", self.name) != self.name:
            raise ValueError(f"the checkpoint was made by ssl.algorithm={state['algorithm']}, this run is {self.name}")
        if self.da is not None and state.get("da") is not None:
            self.da.load_state_dict(state["da"])
        self.load_own_state(state)

    # -- helpers for the state updates: global means over all ranks --
    def global_sum(self, t: torch.Tensor) -> torch.Tensor:
        return self.reduce(t.double())


def ema(old: torch.Tensor, new: torch.Tensor, momentum: float) -> torch.Tensor:
    return momentum * old + (1 - momentum) * new
