"""The one place a training step forwards its inputs: what the algorithm's StepNeeds names, no more.

- The EMA teacher's views (Mean Teacher) go first, through the EMA weights swapped in (distssl.train.ema:
  each rank's own share of them, so ZeRO-3 keeps one copy) and without gradient; swapping after the
  student's forward would change weights that autograd saved for the backward.
- ``ssl.weak_forward=shared_bn``: the labeled batch and the views with gradient in one forward whose
  BatchNorm batch statistics are recorded, then the views without gradient in one no-grad forward
  normalised with those statistics (distssl.train.bnstats), so a pseudo-label and the prediction it
  trains come from the same function.
- ``ssl.weak_forward=concat``: FixMatch's reference step, every view in one forward with gradients;
  the no-grad views' logits are detached (they still pay for the backward).
- An algorithm that mixes its inputs (MixMatch) gets its no-grad views forwarded first, then the batch its
  ``mix`` makes of them and the labeled batch, in one gradient forward (``forward_mixed``).
- An algorithm that perturbs its inputs (VAT) gets ``perturbed``: the student's forward of other
  inputs, BatchNorm normalising with the perturbed batch's own statistics and leaving the running
  ones as they were (USB's ``freeze_bn``); and ``probe``, the same through the bare module, for
  gradients with respect to the input only: DeepSpeed hooks the engine's outputs and reduces the
  weights' gradients after any backward through them. Normalising perturbed batches with the clean
  batch's statistics as constants instead left VAT's EMA weights far below (docs/benchmarks.md,
  development notes), presumably as a gradient blind to the normalisation moves the features' scale.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Callable, Optional

import torch

from distssl.ssl.algorithm import Forwarded, StepNeeds, random_directions
from distssl.train.bnstats import BatchStatsSharing
from distssl.train.ema import EMA


def _split(logits: torch.Tensor, names: list[str], sizes: list[int]) -> dict[str, torch.Tensor]:
    return dict(zip(names, logits.split(sizes))) if names else {}


def forward_mixed(model: Callable[[torch.Tensor], torch.Tensor], needs: StepNeeds, x_lb: torch.Tensor,
                  y_lb: torch.Tensor, views: dict[str, torch.Tensor], mix: Callable, bn_sharing: BatchStatsSharing,
                  generator: torch.Generator, rotate: Optional[Callable] = None) -> Forwarded:
    """StepNeeds.mixes (MixMatch): the no-grad views first (their guesses; each batch normalised with its
    own statistics, the running ones untouched), then ``mix`` makes the gradient forward's inputs and
    targets, forwarded as one batch. One forward of the whole mixed batch gives BatchNorm the statistics of
    labeled and unlabeled rows alike, which is what the paper's code gets by interleaving its separate
    labeled and unlabeled batches before their forwards. ``rotate`` (ReMixMatch): its rotated inputs go
    through the model's rotation head, with gradient."""
    no_grad = list(needs.no_grad)
    with torch.no_grad(), bn_sharing.frozen():
        out = model(torch.cat([views[v] for v in no_grad])).float()
    logits_u = _split(out, no_grad, [views[v].shape[0] for v in no_grad])
    inputs, targets = mix(x_lb, y_lb, views, logits_u, generator)
    logits = model(inputs).float()
    rotation_logits = rotation_targets = None
    if rotate is not None:  # ReMixMatch: the rotation head's forward, with gradient, through the engine
        x_rot, rotation_targets = rotate(views, generator)
        rotation_logits = model(x_rot, head="rotation").float()
    return Forwarded(logits_x=logits, targets_x=y_lb, logits_u=logits_u, mixed_targets=targets,
                     rotation_logits=rotation_logits, rotation_targets=rotation_targets)


def forward_views(model: Callable[[torch.Tensor], torch.Tensor], needs: StepNeeds, x_lb: torch.Tensor,
                  views: dict[str, torch.Tensor], *, weak_forward: str, bn_sharing: BatchStatsSharing,
                  ema: Optional[EMA] = None, module: Optional[torch.nn.Module] = None,
                  noise_key: Optional[tuple[int, int, Optional[torch.Tensor]]] = None) -> Forwarded:
    """Forward the labeled inputs and the unlabeled ``views`` (normalised, on the device) as ``needs``
    says; the labels, ids and step are the caller's to fill in. ``module`` is the bare model inside a
    DeepSpeed engine ``model``, for the forwards whose gradient is taken with respect to the input only
    (``probe``): a backward through the engine's own output would run DeepSpeed's gradient reduction.
    Forwards whose loss trains the weights (``perturbed``) go through the engine, which accounts for
    every parameter's gradient before it reduces them. ``noise_key`` (run seed, step, sample ids): where
    ``needs.input_noise`` adds Gaussian noise to the views with gradient, each sample's is its own draw."""
    if needs.input_noise > 0:
        seed, step, ids = noise_key if noise_key is not None else (0, 0, None)
        views = dict(views)
        for k, v in enumerate(needs.with_grad):
            x = views[v]
            sample_ids = ids if ids is not None else torch.arange(x.shape[0])
            views[v] = x + needs.input_noise * random_directions(x.shape, sample_ids, seed, step, stream=k + 1).to(
                x.device, x.dtype)
    teacher: dict[str, torch.Tensor] = {}
    if needs.teacher:
        if ema is None:
            raise ValueError("an algorithm with a teacher needs the EMA weights")
        with torch.no_grad(), ema.swapped_in():
            out = model(torch.cat([views[v] for v in needs.teacher])).float()
        teacher = _split(out, list(needs.teacher), [views[v].shape[0] for v in needs.teacher])
    grad, no_grad = list(needs.with_grad), list(needs.no_grad)
    b = x_lb.shape[0]
    # BatchNorm statistics are recorded when a later forward replays them: the no-grad views
    record = weak_forward != "concat" and bool(no_grad)
    # the gradient forward's views, in the loader's order (FixMatch's reference: labeled, weak, strong)
    in_one = [v for v in needs.views if v in grad or v in no_grad] if weak_forward == "concat" else grad
    with bn_sharing.record() if record else nullcontext():
        logits = model(torch.cat([x_lb] + [views[v] for v in in_one])).float()
    logits_u = _split(logits[b:], in_one, [views[v].shape[0] for v in in_one])
    for v in no_grad:
        if v in logits_u:
            logits_u[v] = logits_u[v].detach()
    rest = [v for v in no_grad if v not in logits_u]
    if rest:
        with torch.no_grad(), bn_sharing.replay():
            out = model(torch.cat([views[v] for v in rest])).float()
        logits_u.update(_split(out, rest, [views[v].shape[0] for v in rest]))

    perturbed = probe = None
    if needs.perturbs:
        bare = module if module is not None else model

        def perturbed(x: torch.Tensor) -> torch.Tensor:
            with bn_sharing.frozen():
                return model(x).float()

        def probe(x: torch.Tensor) -> torch.Tensor:
            with bn_sharing.frozen():
                return bare(x).float()
    return Forwarded(logits_x=logits[:b], targets_x=torch.empty(0), logits_u=logits_u, teacher_u=teacher,
                     inputs_u={v: views[v] for v in needs.views} if needs.perturbs else {}, perturbed=perturbed,
                     probe=probe)

