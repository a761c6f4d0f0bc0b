"""The forwards of a step, which an algorithm's ``forward`` calls: what its :class:`StepNeeds` names, no more.

The loop hands every algorithm the same :class:`StepInputs` (one micro-batch, the model, the step) and gets a
:class:`Forwarded` back, built whole here. The default step (:func:`forward_views`) serves the pseudo-label
rules and the consistency methods; a family with a step of its own composes these functions in its own file
(MixMatch's and ReMixMatch's MixUp step lives in distssl.ssl.mixmatch; VAT's perturbed forwards, Mean Teacher's
teacher and Pi-Model's input noise are arguments of the default step), as USB's ``train_step`` lets a family own its
step with the default in the base class, without copying forward code.

- The EMA teacher's views (Mean Teacher) go first, through the EMA weights swapped in (distssl.train.ema:
  each rank's own share of them, so ZeRO-3 keeps one copy) and without gradient; swapping after the
  student's forward would change weights that autograd saved for the backward.
- ``train.weak_forward=shared_bn``: the labeled batch and the views with gradient in one forward whose
  BatchNorm batch statistics are recorded, then the views without gradient in one no-grad forward
  normalised with those statistics (distssl.train.bnstats), so a pseudo-label and the prediction it
  trains come from the same function.
- ``train.weak_forward=concat``: FixMatch's reference step, every view in one forward with gradients;
  the no-grad views' logits are detached (they still pay for the backward).
- A perturbing step (VAT) gets ``perturbed``: the student's forward of other inputs, BatchNorm normalising
  with the perturbed batch's own statistics and leaving the running ones as they were (USB's
  ``freeze_bn``); and ``probe``, the same through the bare module, for gradients with respect to the input
  only: DeepSpeed hooks the engine's outputs and reduces the weights' gradients after any backward through
  them. Normalising perturbed batches with the clean batch's statistics as constants instead left VAT's
  EMA weights far below (docs/benchmarks.md, development notes).
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch


@dataclass(frozen=True)
class StepNeeds:
    """The unlabeled views an algorithm's step needs, and how the default step forwards them."""
    views: tuple[str, ...] = ("weak", "strong")  # unlabeled views the loader makes (distssl.data.views)
    with_grad: tuple[str, ...] = ("strong",)  # the student forwards these with gradient, beside the labeled batch
    no_grad: tuple[str, ...] = ("weak",)  # and these without (pseudo-labels)
    heads: tuple[str, ...] = ()  # extra heads (a component's) forwarded with the classifier in the same passes


@dataclass
class StepInputs:
    """One micro-batch as the loop hands it to an algorithm's forward: normalised inputs on the device, and what
    a forward needs of the run."""
    model: Callable[..., torch.Tensor]  # the engine's forward (its gradients are reduced over ranks)
    x_lb: torch.Tensor
    y_lb: torch.Tensor
    views: dict[str, torch.Tensor]  # the unlabeled views the algorithm's needs name
    bn_sharing: Any  # distssl.train.bnstats.BatchStatsSharing of the model
    module: Optional[torch.nn.Module] = None  # the bare model inside the engine (gradients wrt inputs only)
    ema: Any = None  # distssl.train.ema.EMA: the teacher's weights
    weak_forward: str = "shared_bn"  # train.weak_forward
    ids: Optional[torch.Tensor] = None  # each unlabeled sample's stable id
    true_u: Optional[torch.Tensor] = None  # labels of unlabeled images (-1 unknown): pseudo-label accuracy only
    step: int = 0  # optimizer steps before this one
    total_steps: int = 1  # train.steps
    seed: int = 0  # run.seed
    generator: Optional[torch.Generator] = None  # the micro-batch's own draws (MixUp), from (seed, step, rank, i)


@dataclass
class Forwarded:
    """One micro-batch as forwarded for the algorithm."""
    logits_x: torch.Tensor  # labeled, with gradient
    targets_x: torch.Tensor
    logits_u: dict[str, torch.Tensor] = field(default_factory=dict)  # the student's, per view; no_grad ones detached
    teacher_u: dict[str, torch.Tensor] = field(default_factory=dict)  # the EMA weights' logits per view
    inputs_u: dict[str, torch.Tensor] = field(default_factory=dict)  # the normalised view inputs (perturbs)
    # the student's forward of other inputs, BatchNorm normalising with this step's batch statistics
    perturbed: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    # the same through the bare module: only for gradients with respect to the input (VAT's power iteration)
    probe: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    ids: Optional[torch.Tensor] = None  # each unlabeled sample's stable id
    true_u: Optional[torch.Tensor] = None  # labels of unlabeled images (-1 unknown): pseudo-label accuracy only
    step: int = 0  # optimizer steps before this one
    total_steps: int = 1  # train.steps
    seed: int = 0  # run.seed: per-sample random draws (VAT's direction) depend on it, the step and the id
    mixed_targets: Optional[torch.Tensor] = None  # a mixing step's targets of the mixed inputs (logits_x then
    # holds the mixed batch's logits: its labeled rows first)
    head_logits: dict[str, torch.Tensor] = field(default_factory=dict)  # an extra head's, with gradient
    head_targets: dict[str, torch.Tensor] = field(default_factory=dict)
    # the heads ``needs.heads`` names, from the same forwards: on the labeled batch, and per view
    heads_x: dict[str, torch.Tensor] = field(default_factory=dict)
    heads_u: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # head -> view -> outputs


def random_directions(shape: torch.Size, ids: torch.Tensor, seed: int, step: int, stream: int = 0) -> torch.Tensor:
    """One standard normal draw per sample from its own generator, seeded by (seed, step, sample id,
    stream), so a sample's draw does not depend on its batch or the world size (VAT's random start,
    Pi-Model's input noise)."""
    out = torch.empty(shape)
    for i, sample in enumerate(ids.tolist()):
        key = ((seed * 1_000_003 + step) * 2_654_435_761 + sample) * 97 + stream if stream else \
            (seed * 1_000_003 + step) * 2_654_435_761 + sample  # stream 0: VAT's draws as they always were
        out[i] = torch.randn(shape[1:], generator=torch.Generator().manual_seed(key % (2 ** 63)))
    return out


def split_views(logits: torch.Tensor, names: list[str], sizes: list[int]) -> dict[str, torch.Tensor]:
    return dict(zip(names, logits.split(sizes))) if names else {}


def about(inp: StepInputs, **kw) -> dict:
    """The Forwarded fields that say which micro-batch it is."""
    return {"targets_x": inp.y_lb, "ids": inp.ids, "true_u": inp.true_u, "step": inp.step,
            "total_steps": inp.total_steps, "seed": inp.seed, **kw}


def forward_views(inp: StepInputs, needs: StepNeeds, *, teacher: tuple[str, ...] = (), perturbs: bool = False,
                  input_noise: float = 0.0) -> Forwarded:
    """The default step: the labeled inputs and the unlabeled views forwarded as ``needs`` says. ``teacher``:
    views the EMA weights forward too (Mean Teacher); ``perturbs``: the Forwarded gets ``perturbed`` and
    ``probe`` (VAT), through the engine and through the bare module (``inp.module``) respectively; a backward
    through the engine's own output would run DeepSpeed's gradient reduction. ``input_noise``: Gaussian noise
    of that sigma on the views with gradient, each sample's its own draw from (seed, step, id)."""
    model, views = inp.model, inp.views
    if input_noise > 0:
        views = dict(views)
        for k, v in enumerate(needs.with_grad):
            x = views[v]
            sample_ids = inp.ids if inp.ids is not None else torch.arange(x.shape[0])
            views[v] = x + input_noise * random_directions(x.shape, sample_ids, inp.seed, inp.step, stream=k + 1).to(
                x.device, x.dtype)
    teacher_u: dict[str, torch.Tensor] = {}
    if teacher:
        if inp.ema is None:
            raise ValueError("an algorithm with a teacher needs the EMA weights")
        with torch.no_grad(), inp.ema.swapped_in():
            out = model(torch.cat([views[v] for v in teacher])).float()
        teacher_u = split_views(out, list(teacher), [views[v].shape[0] for v in teacher])
    grad, no_grad = list(needs.with_grad), list(needs.no_grad)
    b = inp.x_lb.shape[0]
    # BatchNorm statistics are recorded when a later forward replays them: the no-grad views
    record = inp.weak_forward != "concat" and bool(no_grad)
    # the gradient forward's views, in the loader's order (FixMatch's reference: labeled, weak, strong)
    in_one = [v for v in needs.views if v in grad or v in no_grad] if inp.weak_forward == "concat" else grad
    heads = needs.heads

    def forward(x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if not heads:
            return model(x).float(), {}
        out, extra = model(x, heads=heads)
        return out.float(), {h: o.float() for h, o in extra.items()}

    with inp.bn_sharing.record() if record else nullcontext():
        logits, head_out = forward(torch.cat([inp.x_lb] + [views[v] for v in in_one]))
    sizes = [views[v].shape[0] for v in in_one]
    logits_u = split_views(logits[b:], in_one, sizes)
    heads_x = {h: o[:b] for h, o in head_out.items()}
    heads_u = {h: split_views(o[b:], in_one, sizes) for h, o in head_out.items()}
    for v in no_grad:
        if v in logits_u:
            logits_u[v] = logits_u[v].detach()
            for h in heads_u:
                heads_u[h][v] = heads_u[h][v].detach()
    rest = [v for v in no_grad if v not in logits_u]
    if rest:
        with torch.no_grad(), inp.bn_sharing.replay():
            out, head_out = forward(torch.cat([views[v] for v in rest]))
        sizes = [views[v].shape[0] for v in rest]
        logits_u.update(split_views(out, rest, sizes))
        for h, o in head_out.items():
            heads_u[h].update(split_views(o, rest, sizes))

    perturbed = probe = None
    if perturbs:
        bare = inp.module if inp.module is not None else model

        def perturbed(x: torch.Tensor) -> torch.Tensor:
            with inp.bn_sharing.frozen():
                return model(x).float()

        def probe(x: torch.Tensor) -> torch.Tensor:
            with inp.bn_sharing.frozen():
                return bare(x).float()
    return Forwarded(logits_x=logits[:b], logits_u=logits_u, teacher_u=teacher_u, heads_x=heads_x, heads_u=heads_u,
                     inputs_u={v: views[v] for v in needs.views} if perturbs else {}, perturbed=perturbed,
                     probe=probe, **about(inp))
