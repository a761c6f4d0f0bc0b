"""The seam every SSL algorithm implements, and the parts they share.

An algorithm declares what it needs from a step (:class:`StepNeeds`: which unlabeled views the loader makes,
which of them are forwarded with gradient, which the EMA teacher forwards, whether it forwards perturbed
inputs of its own making); its :meth:`Algorithm.forward` runs the default step (distssl/ssl/step.py) on
exactly that, or a family's own step kept in its file, and gives a :class:`Forwarded` per micro-batch to its
loss: the labeled logits and labels, each view's logits, the teacher's, and each unlabeled sample's stable
id. Its ``loss`` returns the loss and its stats from those, with no forward code. Once per optimizer step
:meth:`Algorithm.end_step` updates its state from the whole global batch (all-reduced or all-gathered over
ranks), so the state is the same on every rank and does not depend on the world size or on gradient
accumulation; within a step the state as of the step's start is used (as distribution alignment always has
here). The state is saved in and restored from the checkpoint
through :meth:`state_dict` / :meth:`load_state_dict`.

Two families share code here. The pseudo-label rules (:class:`ThresholdRule`: FixMatch, FlexMatch,
FreeMatch, SoftMatch, UDA) differ in two small functions, the per-sample weight of the unlabeled
loss and the state update. The consistency methods (Pi-Model, Temporal Ensembling, Mean Teacher, VAT)
weigh their consistency term with the sigmoid ramp-up of Laine & Aila 2017 (:func:`ramp_up`).

An algorithm is one file: its class (``name``, ``needs``, the maths), its paper, and the dataclass of
its own keys (``Config``, the ``ssl.<name>`` section, with their checks); registering the class in
distssl/ssl/__init__.py is the only edit elsewhere (the config tree builds its ``ssl`` section from
that registry).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, ClassVar, Optional, Sequence

import torch
import torch.nn.functional as F

from distssl.data.views import MAX_VIEWS, VIEW_KINDS, is_strong, view_order, views_of  # noqa: F401 - the views, by name
from distssl.distributed.collectives import gather_cat, sum_over_ranks
from distssl.ssl.distalign import DistributionAlignment
from distssl.ssl.step import (  # noqa: F401 - the seam's types, imported from here by the algorithms
    Forwarded,
    StepInputs,
    StepNeeds,
    forward_views,
    random_directions,
)


@dataclass(frozen=True)
class RunShape:
    """The run an algorithm's state lives in. The adaptive rules' momenta and warm-ups were chosen for the
    papers' runs (``PAPER_RUN``: CIFAR, 2^20 steps of mu 7 x B 64 unlabeled images); ``None`` keys of
    theirs are derived from this instead (distssl.ssl.algorithm.run_momentum, FlexMatch's warm-up)."""
    steps: int = 2 ** 20  # train.steps
    unlabeled_per_step: int = 7 * 64  # global mu x B
    num_unlabeled: Optional[int] = None  # the unlabeled set's size, when its index counts it

    @property
    def epochs(self) -> Optional[float]:
        """How many times the run reads its unlabeled set."""
        return self.steps * self.unlabeled_per_step / self.num_unlabeled if self.num_unlabeled else None


PAPER_RUN = RunShape(2 ** 20, 7 * 64, 50_000)  # FixMatch's CIFAR-10 run, which FlexMatch, FreeMatch and SoftMatch keep
MIN_VIEWS_PER_CLASS = 32  # an EMA's memory holds at least this many weak views per class


def run_momentum(shape: RunShape, num_classes: int, paper: float = 0.999) -> float:
    """An EMA momentum for ``shape`` that keeps the paper's memory as a share of the run: 1 / (1 - m) =
    1,000 steps of 2^20 (0.1%) is 1,000 x steps / 2^20 here, but never less than the steps it takes to
    see ``MIN_VIEWS_PER_CLASS`` weak views of every class (a class-wise estimate from fewer is noise).
    The paper's run gets the paper's 0.999; the demo's 400 steps of 112 views over 10 classes get
    0.65 (memory 2.9 steps) where 0.999 left 67% of the initial guess in the state at the end."""
    memory = shape.steps / (1.0 - paper) / PAPER_RUN.steps
    floor = MIN_VIEWS_PER_CLASS * num_classes / max(1, shape.unlabeled_per_step)
    return 1.0 - 1.0 / max(memory, floor, 1.0)


def second_view(augment: str) -> str:
    """The loader's view for a consistency method's ``augment`` key: another weak view (the papers'
    flip-and-translate), or the strong one (RandAugment + Cutout, as UDA and FixMatch train)."""
    if augment not in ("weak", "strong"):
        raise ValueError(f"augment={augment!r}: weak or strong")
    return "weak_2" if augment == "weak" else "strong"


def ramp_up(step: int, total_steps: int, fraction: float) -> float:
    """exp(-5 (1 - T)^2), T = step / (fraction * total_steps) clipped to [0, 1] (Laine & Aila 2017,
    their "Gaussian" ramp-up; 1 from the start when fraction = 0)."""
    if fraction <= 0:
        return 1.0
    t = min(1.0, max(0.0, step / (fraction * max(1, total_steps))))
    return math.exp(-5.0 * (1.0 - t) ** 2)


def softmax_mse(logits: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    """Mean over samples and classes of (softmax(logits) - target)^2: the consistency of Pi-Model,
    Temporal Ensembling and Mean Teacher (USB's ``consistency_loss(..., 'mse')``)."""
    if logits.shape[0] == 0:
        return logits.new_zeros(())
    return F.mse_loss(logits.softmax(dim=1), target_probs, reduction="mean")


class Algorithm:
    """The seam: what a step needs, the loss from what was forwarded, the state over steps."""

    name = "base"
    # the dataclass of its own keys (the ``ssl.<name>`` section), beside it in its file: each key's
    # default cited, and ``validate(check)`` for the ranges its type does not say
    Config: ClassVar[Optional[type]] = None
    # what its step needs: the class's default; an instance's ``needs`` (set from it, or by its own keys) is
    # the one the feed and the step read
    NEEDS: ClassVar[StepNeeds] = StepNeeds()
    # extra heads on the backbone's pooled features, by name -> outputs (ReMixMatch's 4-way rotation head):
    # attached to the model, trained through its forward (``model(x, head=name)``), saved, never exported
    heads: ClassVar[dict[str, int]] = {}
    needs_ids = False  # per-sample state (FlexMatch, Temporal Ensembling): the unlabeled set needs index.json counts
    uses_dist_align = False  # whether ssl.dist_align applies (it aligns weak-view pseudo-label probabilities)

    def __init__(self, num_classes: int, *, tau: float, lambda_u: float,
                 da: Optional[DistributionAlignment] = None, num_unlabeled: Optional[int] = None,
                 reduce: Callable[[torch.Tensor], torch.Tensor] = sum_over_ranks,
                 gather: Callable[[torch.Tensor], torch.Tensor] = gather_cat, shape: Optional[RunShape] = None,
                 components: Sequence = (), **own):
        if own and self.Config is None:
            raise TypeError(f"ssl.algorithm={self.name} has no keys of its own, got {sorted(own)}")
        self.own = self.Config(**own) if self.Config is not None else None  # its ssl.<name> keys
        self.needs = self.NEEDS
        # components (distssl.ssl.component: ssl.open_set, ssl.imbalance): their heads join the algorithm's
        if components and not isinstance(self, ThresholdRule):
            raise ValueError(f"{', '.join(c.name for c in components)} works with a pseudo-label rule (fixmatch, "
                             f"flexmatch, freematch, softmatch, uda), not ssl.algorithm={self.name}")
        self.components = list(components)
        if self.components:
            self.heads = {**type(self).heads, **{k: v for c in self.components for k, v in c.heads.items()}}
            self.needs = replace(self.needs, heads=tuple(h for c in self.components for h in c.heads))
        heads_to_eval = [c.eval_head for c in self.components if c.eval_head]
        self.eval_head: Optional[str] = heads_to_eval[0] if heads_to_eval else None
        self.kept_heads = tuple(c.kept_head for c in self.components if c.kept_head)  # an export carries these
        self.export_meta = {k: v for c in self.components for k, v in c.export_meta().items()}
        # the run it is in (the papers' when not said); ``derived``: the keys left null, as derived from it
        self.shape = shape or RunShape(num_unlabeled=num_unlabeled)
        self.derived: dict[str, object] = {}
        self.num_classes, self.tau, self.lambda_u = num_classes, tau, lambda_u
        self.da = da if self.uses_dist_align else None
        self.num_unlabeled, self.reduce, self.gather = num_unlabeled, reduce, gather
        if self.needs_ids and not num_unlabeled:
            raise ValueError(f"ssl.algorithm={self.name} keeps state per unlabeled sample: data.unlabeled needs "
                             f"index.json counts (a shard set, not a brace pattern)")

    def forward(self, inp: StepInputs) -> Forwarded:
        """The step's forwards for this micro-batch: the default step (distssl.ssl.step.forward_views) of what
        ``needs`` names; a family with a step of its own overrides this in its file."""
        return forward_views(inp, self.needs)

    def loss(self, fw: Forwarded) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def own_key(self, key: str, derive: Callable[[], object]):
        """The ``ssl.<name>.<key>`` value, or, when it is null, the one ``derive`` gives for this run
        (recorded in ``derived``: the run logs it and keeps it in summary.json)."""
        value = getattr(self.own, key)
        if value is None:
            value = derive()
            self.derived[f"ssl.{self.name}.{key}"] = value
        return value

    def end_step(self) -> None:
        """Once per optimizer step, on every rank, after the micro-batches' losses."""

    def own_state(self) -> dict:
        return {}

    def load_own_state(self, state: dict) -> None:
        pass

    def state_dict(self) -> dict:
        return {"algorithm": self.name, "da": self.da.state_dict() if self.da is not None else None,
                **self.own_state(), **{f"component/{c.name}": c.state_dict() for c in self.components}}

    def load_state_dict(self, state: dict) -> None:
        if state.get("algorithm", self.name) != self.name:
            raise ValueError(f"ssl.algorithm: the checkpoint was made by ssl.algorithm={state['algorithm']}, this run "
                             f"is {self.name}: resume with ssl.algorithm={state['algorithm']}")
        if self.da is not None and state.get("da") is not None:
            self.da.load_state_dict(state["da"])
        for c in self.components:
            if f"component/{c.name}" not in state:
                raise ValueError(f"the checkpoint was made without {c.name}: resume without it, or start a new "
                                 "run.out_dir")
            c.load_state_dict(state[f"component/{c.name}"])
        self.load_own_state(state)

    # -- helpers for the state updates: global sums over all ranks --
    def global_sum(self, t: torch.Tensor) -> torch.Tensor:
        return self.reduce(t.double())

    @staticmethod
    def supervised_loss(fw: Forwarded) -> torch.Tensor:
        return F.cross_entropy(fw.logits_x, fw.targets_x)


class ThresholdRule(Algorithm):
    """FixMatch's loss structure: CE(labeled) + lambda_u * mean_u[ w * CE(strong, argmax weak) ]."""

    uses_dist_align = True
    # the pseudo-labels (the unlabeled loss's targets) come from the aligned probabilities; False: from the
    # raw ones, alignment shaping the weights alone (SoftMatch's uniform alignment, as its authors' code)
    labels_from_aligned: ClassVar[bool] = True

    def __init__(self, num_classes: int, **kw):
        super().__init__(num_classes, **kw)
        self._raw, self._probs, self._ids = [], [], []
        self._step = 0  # optimizer steps done once this one ends (a component's schedule)

    # -- what a rule defines --
    def weights(self, probs: torch.Tensor, ids: Optional[torch.Tensor]) -> torch.Tensor:
        """Per-sample weight of the unlabeled loss (a 0/1 mask for threshold rules), from the state
        as it stands."""
        raise NotImplementedError

    def update(self, probs: torch.Tensor, ids: Optional[torch.Tensor]) -> None:
        """Update the state from this step's weak-view probabilities of every rank (``probs`` and
        ``ids`` are already gathered or are to be reduced by the algorithm with ``self.reduce``)."""

    def extra_loss(self, logits_s: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, dict]:
        return logits_s.new_zeros(()), {}

    def labeled_loss(self, logits_x: torch.Tensor, targets_x: torch.Tensor, step: int, total_steps: int
                     ) -> tuple[torch.Tensor, dict]:
        return F.cross_entropy(logits_x, targets_x), {}

    def unlabeled_loss(self, logits_s: torch.Tensor, targets: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """Averaged over the whole unlabeled batch, masked or not, as in the papers; ``targets``: the weak
        view's probabilities the pseudo-labels are taken from."""
        return (F.cross_entropy(logits_s, targets.argmax(dim=1), reduction="none") * w).mean()

    # -- the shared part --
    def loss(self, fw: Forwarded) -> tuple[torch.Tensor, dict[str, float]]:
        probs_w = torch.softmax(fw.logits_u["weak"].detach(), dim=1)
        return self.rule_loss(fw.logits_x, fw.targets_x, fw.logits_u["strong"], probs_w, ids=fw.ids,
                              true_u=fw.true_u, step=fw.step, total_steps=fw.total_steps, fw=fw)

    def rule_loss(self, logits_x: torch.Tensor, targets_x: torch.Tensor, logits_s: torch.Tensor,
                  probs_w: torch.Tensor, ids: Optional[torch.Tensor] = None, true_u: Optional[torch.Tensor] = None,
                  step: int = 0, total_steps: int = 1, fw: Optional[Forwarded] = None
                  ) -> tuple[torch.Tensor, dict[str, float]]:
        probs_w = probs_w.detach()
        probs = self.da.align_with_current(probs_w) if self.da is not None else probs_w
        self._raw.append(probs_w)
        self._probs.append(probs)
        self._step = step + 1
        if ids is not None:
            self._ids.append(ids)
        loss_x, x_stats = self.labeled_loss(logits_x, targets_x, step, total_steps)
        targets = probs if self.labels_from_aligned else probs_w
        w = self.weights(probs, ids) if probs.shape[0] else probs.new_zeros(0)
        component_stats: dict = {}
        for c in self.components:  # ACR: pseudo-labels adjusted; a sample counts where either is confident
            adjusted = c.adjust(targets) if probs.shape[0] else None
            if adjusted is not None:
                w = torch.maximum(self.weights(adjusted, ids), w)
                targets = adjusted
        for c in self.components:  # IOMatch: outliers out of the rule's loss
            if probs.shape[0]:
                w, more = c.gate(fw, probs, w)
                component_stats.update(more)
        pseudo = targets.argmax(dim=1)
        if logits_s.shape[0] == 0:  # no unlabeled images: a plain supervised step, not NaN
            loss_u = logits_x.new_zeros(())
        else:
            loss_u = self.unlabeled_loss(logits_s, targets, w)
        extra, extra_stats = self.extra_loss(logits_s, w)
        for c in self.components:
            more_loss, more = c.loss(fw, probs)
            extra = extra + more_loss
            component_stats.update(more)
        loss = loss_x + self.lambda_u * loss_u + extra
        # stats stay tensors on the device: the loop reads them back once per log interval, not per step
        stats = {"loss": loss.detach(), "loss_x": loss_x.detach(), "loss_u": loss_u.detach(),
                 "mask_rate": (w > 0).float().mean() if w.numel() else float("nan"),
                 "weight_mean": w.mean() if w.numel() else float("nan"), **extra_stats, **x_stats,
                 **component_stats}
        if true_u is not None:
            known = true_u >= 0
            correct = (pseudo == true_u) & known
            masked_known = known & (w > 0)
            stats["pseudo_acc"] = share(correct & masked_known, masked_known)
            stats["pseudo_acc_all"] = share(correct, known)
        return loss, stats

    @torch.no_grad()
    def end_step(self) -> None:
        """Once per optimizer step, on every rank: DA's p_model and the algorithm's state move with
        the global batch."""
        for c in self.components:
            c.end_step(self._step)
        if not self._raw:
            return
        raw, probs = torch.cat(self._raw), torch.cat(self._probs)
        ids = torch.cat(self._ids) if self._ids else None
        self._raw, self._probs, self._ids = [], [], []
        if self.da is not None:
            self.da.update(raw)
        self.update(probs, ids)


@dataclass
class RampedConfig:
    """The keys every consistency method has: its weight and its ramp-up."""
    weight: float = 1.0  # consistency weight w_max
    rampup: float = 0.4  # fraction of the run's steps over which the weight ramps up as exp(-5 (1 - T)^2)

    def validate(self, check: Callable) -> None:
        check(self.weight >= 0, "weight", self.weight, ">= 0")
        check(0.0 <= self.rampup <= 1.0, "rampup", self.rampup, "a fraction of train.steps, 0..1")


def share(hits: torch.Tensor, of: torch.Tensor) -> torch.Tensor:
    """hits.sum() / of.sum() of two boolean masks, as a tensor (NaN when ``of`` is empty): no host sync,
    where indexing by a mask or ``if mask.any()`` would wait for the device."""
    return hits.sum().float() / of.sum().float()


def ema(old: torch.Tensor, new: torch.Tensor, momentum: float) -> torch.Tensor:
    return momentum * old + (1 - momentum) * new


class Consistency(Algorithm):
    """CE(labeled) + lambda_u * weight * ramp_up(step) * consistency + extra: Pi-Model, Temporal
    Ensembling, Mean Teacher, VAT. ``weight`` is the method's own (its paper's or USB's) and
    ``ssl.lambda_u`` scales it (1 = the method's default, 0 = the supervised baseline)."""

    def __init__(self, num_classes: int, **kw):
        super().__init__(num_classes, **kw)
        self.weight, self.rampup = self.own.weight, self.own.rampup

    def consistency(self, fw: Forwarded) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
        """(consistency term, extra loss not ramped, the class each unlabeled sample is taken to be, stats)."""
        raise NotImplementedError

    def loss(self, fw: Forwarded) -> tuple[torch.Tensor, dict[str, float]]:
        loss_x = self.supervised_loss(fw)
        if all(t.shape[0] == 0 for t in fw.logits_u.values()):  # no unlabeled images: a supervised step
            zero = loss_x.new_zeros(())
            loss_u, extra, guessed, own = zero, zero, loss_x.new_zeros(0, dtype=torch.long), {}
        else:
            loss_u, extra, guessed, own = self.consistency(fw)
        w = ramp_up(fw.step, fw.total_steps, self.rampup)
        loss = loss_x + self.lambda_u * self.weight * w * loss_u + extra
        stats = {"loss": loss.detach(), "loss_x": loss_x.detach(), "loss_u": loss_u.detach(),
                 "consistency_weight": self.lambda_u * self.weight * w, **own}
        if fw.true_u is not None and guessed.numel():
            known = fw.true_u >= 0
            stats["pseudo_acc_all"] = share((guessed == fw.true_u) & known, known)
        return loss, stats
