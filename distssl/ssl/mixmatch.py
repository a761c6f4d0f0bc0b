"""MixMatch (Berthelot et al. 2019, "MixMatch: A Holistic Approach to Semi-Supervised Learning").

Each unlabeled image is augmented K times (weak views: flip and crop); the guess is the mean of the K
softmax predictions (no gradient), sharpened at temperature T. The labeled batch (one-hot targets) and
the K unlabeled batches (the guess as target, once per view) are concatenated, shuffled, and MixUp'd
with the shuffled copy at lambda' = max(lambda, 1 - lambda), lambda ~ Beta(alpha, alpha), so each mixed
sample stays closer to its own. The mixed batch is forwarded once with gradient (:func:`forward_mixed`, this
family's step; BatchNorm sees labeled and unlabeled rows in one batch, which is what the paper's
code gets by interleaving); the loss is the cross-entropy of the mixed labeled rows against their mixed
targets plus weight x ramp x the mean squared error between the softmax of the mixed unlabeled rows and
their mixed targets. Defaults, the paper's CIFAR-10 settings: K 2, T 0.5, alpha 0.75, weight (lambda_U)
75, ramped up linearly over its first 16,384 steps (1/64 of its 2^20), at most 0.4 of a shorter run.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from distssl.ssl.algorithm import Algorithm, Forwarded, StepNeeds, share, views_of
from distssl.ssl.step import StepInputs, about, split_views


def sharpen(p: torch.Tensor, temperature: float) -> torch.Tensor:
    """p^(1/T), renormalised over the classes."""
    q = p ** (1.0 / temperature)
    return q / q.sum(dim=1, keepdim=True)


def mixup(inputs: torch.Tensor, targets: torch.Tensor, alpha: float, generator: torch.Generator
          ) -> tuple[torch.Tensor, torch.Tensor, float, torch.Tensor]:
    """(mixed inputs, mixed targets, lambda', permutation): each row mixed with a row of the shuffled batch
    at lambda' = max(lambda, 1 - lambda), lambda ~ Beta(alpha, alpha) (one per batch, as the paper)."""
    rng = np.random.default_rng(int(torch.randint(2 ** 62, (1,), generator=generator)))
    lam = float(rng.beta(alpha, alpha)) if alpha > 0 else 1.0
    lam = max(lam, 1.0 - lam)
    perm = torch.randperm(inputs.shape[0], generator=generator).to(inputs.device)
    return (lam * inputs + (1 - lam) * inputs[perm], lam * targets + (1 - lam) * targets[perm], lam, perm)


def linear_ramp(step: int, total_steps: int, fraction: float) -> float:
    """step / (fraction x total_steps), clipped to [0, 1] (MixMatch's and USB's linear warm-up)."""
    return 1.0 if fraction <= 0 else min(1.0, step / (fraction * max(1, total_steps)))


@dataclass
class MixMatchConfig:
    """Berthelot et al. 2019, the CIFAR-10 settings of its section 4."""
    k: int = 2  # augmentations of each unlabeled image whose predictions make its guess
    temperature: float = 0.5  # sharpening temperature T
    alpha: float = 0.75  # MixUp's Beta(alpha, alpha)
    weight: float = 75.0  # lambda_U, the unlabeled (L2) loss weight (USB's CIFAR configs: 100), times ssl.lambda_u
    # the weight's linear ramp-up, a fraction of train.steps; null = the paper's 16,384 steps (1/64 of its
    # 2^20), at most 0.4 of a shorter run (see ramp_fraction)
    rampup: Optional[float] = None

    def validate(self, check) -> None:
        check(1 <= self.k <= 16, "k", self.k, "1..16 views of each unlabeled image")
        check(self.temperature > 0, "temperature", self.temperature, "> 0")
        check(self.alpha >= 0, "alpha", self.alpha, ">= 0 (0: no MixUp)")
        check(self.weight >= 0, "weight", self.weight, ">= 0")
        check(self.rampup is None or 0.0 <= self.rampup <= 1.0, "rampup", self.rampup,
              "a fraction of train.steps, 0..1, or null (derived from the run)")


PAPER_RAMP_STEPS = 16_384  # MixMatch's and ReMixMatch's linear ramp-up (1/64 of their 2^20 steps)


def ramp_fraction(steps: int) -> float:
    """The papers' ramp length as a share of this run, at most 0.4 of it (the consistency methods' share,
    Laine & Aila's and USB's). On the demo's 400 steps 1/64 of the run is 6 steps: the L2 term reached
    full weight on a random model's guesses and MixMatch collapsed to 14.3% (supervised 72); ramped over
    0.4 of the run it reached 81.2 (docs/benchmarks.md)."""
    return min(PAPER_RAMP_STEPS / max(1, steps), 0.4)


def forward_mixed(inp: StepInputs, needs: StepNeeds, mix: Callable,
                  heads: Optional[dict[str, Callable]] = None) -> Forwarded:
    """A mixing step (MixMatch): the no-grad views first (their guesses; each batch normalised with its own
    statistics, the running ones untouched), then ``mix(x_lb, y_lb, views, logits_u, generator)`` makes the
    gradient forward's inputs and targets, forwarded as one batch. One forward of the whole mixed batch gives
    BatchNorm the statistics of labeled and unlabeled rows alike, which is what the paper's code gets by
    interleaving its separate labeled and unlabeled batches before their forwards. ``heads`` (ReMixMatch's
    rotation): name -> ``f(views, generator) -> (inputs, targets)`` forwarded through that head, with gradient."""
    model, views = inp.model, inp.views
    no_grad = list(needs.no_grad)
    with torch.no_grad(), inp.bn_sharing.frozen():
        out = model(torch.cat([views[v] for v in no_grad])).float()
    logits_u = split_views(out, no_grad, [views[v].shape[0] for v in no_grad])
    inputs, targets = mix(inp.x_lb, inp.y_lb, views, logits_u, inp.generator)
    logits = model(inputs).float()
    head_logits, head_targets = {}, {}
    for name, make in (heads or {}).items():  # through the engine: DeepSpeed reduces the head's gradients too
        x_head, head_targets[name] = make(views, inp.generator)
        head_logits[name] = model(x_head, head=name).float()
    return Forwarded(logits_x=logits, logits_u=logits_u, mixed_targets=targets, head_logits=head_logits,
                     head_targets=head_targets, **about(inp))


class MixMatch(Algorithm):
    name = "mixmatch"
    Config = MixMatchConfig

    def __init__(self, num_classes: int, **kw):
        super().__init__(num_classes, **kw)
        o = self.own
        self.k, self.temperature, self.alpha, self.weight = o.k, o.temperature, o.alpha, o.weight
        self.rampup = self.own_key("rampup", lambda: ramp_fraction(self.shape.steps))
        guesses = views_of("weak", o.k)
        # an instance's needs: its K weak views, all without gradient; the gradient forward is the mixed batch
        self.needs = StepNeeds(views=guesses, with_grad=(), no_grad=guesses)

    def forward(self, inp):
        """Its own step: the K guesses' forward, then one gradient forward of the batch ``mix`` makes."""
        return forward_mixed(inp, self.needs, self.mix)

    def guess(self, logits_u: dict[str, torch.Tensor]) -> torch.Tensor:
        """The K views' mean softmax, sharpened: each image's target."""
        probs = torch.stack([logits_u[v].softmax(dim=1) for v in self.needs.no_grad]).mean(dim=0)
        return sharpen(probs, self.temperature)

    def mix(self, x_lb, y_lb, views, logits_u, generator):
        q = self.guess(logits_u).detach()
        inputs = torch.cat([x_lb] + [views[v] for v in self.needs.views])
        targets = torch.cat([F.one_hot(y_lb, self.num_classes).float()] + [q] * self.k)
        mixed_inputs, mixed_targets, _, _ = mixup(inputs, targets, self.alpha, generator)
        return mixed_inputs.to(x_lb.dtype), mixed_targets

    def loss(self, fw: Forwarded) -> tuple[torch.Tensor, dict]:
        n = fw.targets_x.shape[0]
        logits, targets = fw.logits_x, fw.mixed_targets
        loss_x = -(targets[:n] * F.log_softmax(logits[:n], dim=1)).sum(dim=1).mean()
        loss_u = F.mse_loss(logits[n:].softmax(dim=1), targets[n:]) if logits.shape[0] > n else loss_x.new_zeros(())
        w = self.lambda_u * self.weight * linear_ramp(fw.step, fw.total_steps, self.rampup)
        loss = loss_x + w * loss_u
        stats = {"loss": loss.detach(), "loss_x": loss_x.detach(), "loss_u": loss_u.detach(), "consistency_weight": w}
        if fw.true_u is not None and fw.logits_u:
            known = fw.true_u >= 0
            stats["pseudo_acc_all"] = share((self.guess(fw.logits_u).argmax(dim=1) == fw.true_u) & known, known)
        return loss, stats
