"""Components a pseudo-label rule (distssl.ssl.algorithm.ThresholdRule) can add: ``ssl.open_set`` (IOMatch) and
``ssl.imbalance`` (ABC, ACR). The maths is in distssl.ssl.open_set and distssl.ssl.imbalance; this is the seam.

A component declares heads on the backbone's pooled features (forwarded in the rule's own passes, so they cost
no extra backbone pass), may adjust the probabilities the rule takes its pseudo-labels and weights from, may gate
the rule's per-sample weights, adds its own loss, and updates its state once per optimizer step from every rank
(as DA does), saved with the algorithm's. ``eval_head``: a head that replaces the classifier at eval and export
(a balanced classifier).
"""
from __future__ import annotations

from typing import Callable, ClassVar, Optional

import torch

from distssl.ssl import imbalance, open_set
from distssl.ssl.step import Forwarded


def head_specs(open_set_method: str, imbalance_method: str, num_classes: int, projection: int = 128) -> dict:
    """The extra heads ``ssl.open_set`` and ``ssl.imbalance`` put on the backbone (distssl.models.factory.add_heads
    specs): what a run's checkpoint holds beside the timm model."""
    heads: dict = {}
    if open_set_method != "none":
        heads[OUTLIER_HEAD] = lambda features: open_set.OpenSetHead(features, num_classes, projection)
    if imbalance_method != "none":
        heads[BALANCED_HEAD] = num_classes
    return heads


def outlier_meta(projection: int) -> dict:
    """model.json's entry for an export that carries IOMatch's head (its weights under ``open_set_head.``):
    distssl-predict scores each image's outlier probability with it."""
    return {"outlier_head": {"method": "iomatch", "prefix": f"{OUTLIER_HEAD}_head.", "projection": projection,
                             "unknown_at": open_set.OUTLIER_AT}}


OUTLIER_HEAD, BALANCED_HEAD = "open_set", "balanced"


class Component:
    name: ClassVar[str] = "base"
    eval_head: ClassVar[Optional[str]] = None  # a head that stands for the classifier at eval and export
    kept_head: ClassVar[Optional[str]] = None  # a head the export carries (beside the timm model's weights)

    def export_meta(self) -> dict:
        return {}

    def __init__(self, num_classes: int, *, threshold: float, total_steps: int,
                 reduce: Callable[[torch.Tensor], torch.Tensor], label_histogram: Optional[list] = None):
        self.num_classes, self.threshold, self.total_steps, self.reduce = (num_classes, threshold,
                                                                           max(1, total_steps), reduce)
        self.label_histogram = label_histogram
        self.heads: dict = {}

    def progress(self, step: int) -> float:
        return min(1.0, step / self.total_steps)

    def adjust(self, probs: torch.Tensor) -> Optional[torch.Tensor]:
        """Probabilities to take pseudo-labels from instead of ``probs`` (None: keep them)."""
        return None

    def gate(self, fw: Forwarded, probs: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """The rule's per-sample weights after this component (and stats)."""
        return w, {}

    def loss(self, fw: Forwarded, probs: torch.Tensor) -> tuple[torch.Tensor, dict]:
        return fw.logits_x.new_zeros(()), {}

    def end_step(self, step: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class IOMatch(Component):
    """IOMatch (distssl.ssl.open_set): the outlier head, the open-set target, outliers out of the rule's loss."""
    name = "iomatch"
    kept_head = OUTLIER_HEAD

    def __init__(self, num_classes: int, cfg: open_set.IOMatchConfig, **kw):
        super().__init__(num_classes, **kw)
        self.cfg = cfg
        self.heads = head_specs("iomatch", "none", num_classes, cfg.projection)
        self._weak_scores: Optional[torch.Tensor] = None  # this step's, from gate (which runs before loss)

    def export_meta(self) -> dict:
        return outlier_meta(self.cfg.projection)

    def _ova(self, out: torch.Tensor) -> torch.Tensor:
        return open_set.split_outputs(out, self.num_classes)[0]

    def gate(self, fw, probs, w):
        # the authors' in_mask: a sample whose outlier score reaches 0.5 is out of the closed-set loss
        scores = open_set.outlier_scores(probs, self._ova(fw.heads_u[OUTLIER_HEAD]["weak"])).detach()
        self._weak_scores = scores  # the step's loss reads them again (pseudo_inliers): computed once
        inlier = (scores < open_set.OUTLIER_AT).to(w.dtype)
        return w * inlier, {"outlier_share": 1.0 - inlier.mean()}

    def loss(self, fw, probs):
        ova_x, _ = open_set.split_outputs(fw.heads_x[OUTLIER_HEAD], self.num_classes)
        loss_ova = open_set.one_vs_all_loss(ova_x, fw.targets_x)
        zero = loss_ova.new_zeros(())
        if probs.shape[0] == 0:
            return self.cfg.lambda_ova * loss_ova, {"loss_ova": loss_ova.detach(), "loss_open": zero}
        with torch.no_grad():
            q = open_set.open_set_targets(probs, self._ova(fw.heads_u[OUTLIER_HEAD]["weak"]))
            mask = (q.max(dim=1).values >= self.cfg.q_cutoff).float()
        _, open_s = open_set.split_outputs(fw.heads_u[OUTLIER_HEAD]["strong"], self.num_classes)
        loss_open = (open_set.soft_cross_entropy(open_s, q) * mask).mean()
        if self.progress(fw.step) < self.cfg.warmup:  # the authors' first epoch: no open-set loss
            loss_open = loss_open * 0.0
        loss = self.cfg.lambda_ova * loss_ova + self.cfg.lambda_open * loss_open
        stats = {"loss_ova": loss_ova.detach(), "loss_open": loss_open.detach(), "open_mask_rate": mask.mean()}
        if self.cfg.pseudo_inliers:
            with torch.no_grad():
                conf, pseudo = probs.max(dim=1)
                keep = ((conf >= self.threshold) & (self._weak_scores < open_set.OUTLIER_AT)).float()
            ova_s = self._ova(fw.heads_u[OUTLIER_HEAD]["strong"])
            loss = loss + self.cfg.pseudo_inliers * open_set.one_vs_all_loss(ova_s, pseudo, keep)
        if self.cfg.lambda_em or self.cfg.lambda_socr:  # OpenMatch's terms (need the weak view with gradient)
            ova_w = self._ova(fw.heads_u[OUTLIER_HEAD]["weak"])
            ova_s = self._ova(fw.heads_u[OUTLIER_HEAD]["strong"])
            loss = loss + self.cfg.lambda_em * open_set.one_vs_all_entropy(ova_s) \
                + self.cfg.lambda_socr * open_set.one_vs_all_consistency(ova_w, ova_s)
        return loss, stats


class Balanced(Component):
    """The balanced head both long-tail methods keep; it is the head the run evaluates and exports."""
    eval_head = BALANCED_HEAD

    def __init__(self, num_classes: int, **kw):
        super().__init__(num_classes, **kw)
        if not self.label_histogram or sum(self.label_histogram) <= 0:
            raise ValueError(f"ssl.imbalance={self.name} needs the labeled set's class histogram: data.labeled must "
                             "be a shard set with index.json (not a brace pattern)")
        self.shares = imbalance.class_shares(self.label_histogram)
        self.heads = head_specs("none", self.name, num_classes)


class ABC(Balanced):
    """ABC (distssl.ssl.imbalance): the balanced head trained with class-balanced Bernoulli masks."""
    name = "abc"

    def __init__(self, num_classes: int, cfg: imbalance.ABCConfig, **kw):
        super().__init__(num_classes, **kw)
        self.cfg = cfg
        self.keep = imbalance.abc_keep_labeled(self.label_histogram)

    def loss(self, fw, probs):
        b = fw.heads_x[BALANCED_HEAD]
        weak, strong = fw.heads_u[BALANCED_HEAD]["weak"], fw.heads_u[BALANCED_HEAD]["strong"]
        # the masks' draws: from (seed, step, first sample id), so a resumed step draws what it drew
        first = int(fw.ids[0]) if fw.ids is not None and fw.ids.numel() else 0
        g = torch.Generator().manual_seed((fw.seed * 1_000_003 + fw.step) * 2_654_435_761 + first)
        draws_x, draws_u = torch.rand(b.shape[0], generator=g), torch.rand(strong.shape[0], generator=g)
        loss, mask_u = imbalance.abc_loss(b, fw.targets_x, draws_x, weak, strong, draws_u, self.keep,
                                          self.progress(fw.step), self.cfg.p_cutoff)
        return self.cfg.weight * loss, {"loss_balanced": loss.detach(),
                                        "balanced_mask_rate": mask_u.mean() if mask_u.numel() else float("nan")}


class ACR(Balanced):
    """ACR (distssl.ssl.imbalance): the classifier's pseudo-labels adjusted by tau log pi, tau adapting to the
    unlabeled set's estimated class mix; the balanced head trained with the logit-adjusted loss."""
    name = "acr"

    def __init__(self, num_classes: int, cfg: imbalance.ACRConfig, **kw):
        super().__init__(num_classes, **kw)
        self.cfg = cfg
        self.tau = cfg.tau1  # the authors' start: the full adjustment
        self.estimate = torch.full((num_classes,), 1.0 / num_classes)
        self.divergences, self.divergence_steps = torch.zeros(3, dtype=torch.float64), 0
        self._confident: list[torch.Tensor] = []

    def adjust(self, probs):
        return imbalance.adjusted_probs(probs.clamp_min(1e-12).log(), imbalance.adjustment(self.shares, self.tau))

    def loss(self, fw, probs):
        weak, strong = fw.heads_u[BALANCED_HEAD]["weak"], fw.heads_u[BALANCED_HEAD]["strong"]
        loss, mask_b = imbalance.acr_balanced_loss(fw.heads_x[BALANCED_HEAD], fw.targets_x, fw.logits_u["weak"],
                                                   weak, strong, self.shares, self.cfg.tau12, self.cfg.tau2,
                                                   self.threshold)
        if weak.shape[0]:
            hist = torch.bincount(weak.argmax(dim=1)[mask_b], minlength=self.num_classes)
            self._confident.append(hist.double())
        return loss, {"loss_balanced": loss.detach(), "acr_tau": self.tau}

    @torch.no_grad()
    def end_step(self, step: int) -> None:
        hist = torch.stack(self._confident).sum(dim=0) if self._confident else \
            torch.zeros(self.num_classes, dtype=torch.float64)
        self._confident = []
        hist = self.reduce(hist).cpu()
        if step < self.cfg.estimate_from * self.total_steps:
            return
        if hist.sum() > 0:  # the authors': a step without a confident balanced prediction adds no divergence
            m = self.cfg.ema_u
            self.estimate = (m * self.estimate.double() + (1 - m) * hist / hist.sum()).float()
            self.divergences += imbalance.acr_divergences(self.estimate.clamp_min(1e-12), self.shares)
        self.divergence_steps += 1  # but counts in the mean (their count_KL / eval_step)
        every = max(1, round(self.cfg.update_every * self.total_steps))
        if self.divergence_steps >= every:
            self.tau = imbalance.acr_tau(self.divergences / self.divergence_steps, self.cfg.tau1)
            self.divergences, self.divergence_steps = torch.zeros(3, dtype=torch.float64), 0

    def state_dict(self) -> dict:
        return {"tau": self.tau, "estimate": self.estimate.clone(), "divergences": self.divergences.clone(),
                "divergence_steps": self.divergence_steps}

    def load_state_dict(self, state: dict) -> None:
        self.tau, self.estimate = float(state["tau"]), state["estimate"].float()
        self.divergences, self.divergence_steps = state["divergences"].double(), int(state["divergence_steps"])


OPEN_SET = {"iomatch": (IOMatch, open_set.IOMatchConfig)}
IMBALANCE = {"abc": (ABC, imbalance.ABCConfig), "acr": (ACR, imbalance.ACRConfig)}
SECTIONS = {name: cfg for name, (_, cfg) in {**OPEN_SET, **IMBALANCE}.items()}  # the ssl.<name> sections
