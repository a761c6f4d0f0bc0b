"""ReMixMatch (Berthelot et al. 2020, "ReMixMatch: Semi-Supervised Learning with Distribution Alignment and
Augmentation Anchoring").

The guess of each unlabeled image comes from its weak view alone (no gradient): its softmax, distribution
aligned (p_target / p_model, ``ssl.dist_align``: DA is part of the method) and sharpened at T. Augmentation
anchoring: K strong views of the image are all trained towards that guess. The labeled batch (one-hot),
the K strong batches and the weak batch (each with the guess as its target, as the reference code and USB
mix them) are MixUp'd as in MixMatch (lambda' = max(lambda, 1 - lambda),
lambda ~ Beta(alpha, alpha)) and forwarded once with gradient. The losses: cross-entropy of the mixed
labeled rows; ``weight`` x the cross-entropy of the mixed unlabeled rows against their soft targets;
``pre_mixup_weight`` x the cross-entropy of the first strong view, unmixed (forwarded with the mixed
batch), against the guess; ``rotation_weight`` x the cross-entropy of a 4-way rotation head (added to the
timm backbone, never exported) on that view rotated by 0, 90, 180 or 270 degrees. The two unlabeled
weights ramp up linearly over ``rampup`` of the run. Defaults: the paper's (section 4: K 8, T 0.5, alpha
0.75, lambda_U 1.5, lambda_U1 0.5, lambda_r 0.5; its 1/64 ramp as USB's ``unsup_warm_up``). With K 8 a
step forwards 8 strong views of every unlabeled image: ``ssl.remixmatch.k=2`` (USB's) costs a quarter.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from distssl.ssl.algorithm import Algorithm, Forwarded, StepNeeds, share, views_of
from distssl.ssl.mixmatch import forward_mixed, linear_ramp, mixup, sharpen


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    if logits.shape[0] == 0:
        return logits.new_zeros(())
    return -(targets * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


def rotate_quarters(x: torch.Tensor, quarters: torch.Tensor) -> torch.Tensor:
    """Each NCHW image rotated by ``quarters[i]`` x 90 degrees (square images)."""
    return torch.stack([torch.rot90(img, int(q), dims=(1, 2)) for img, q in zip(x, quarters.tolist())]) \
        if x.shape[0] else x


@dataclass
class ReMixMatchConfig:
    """Berthelot et al. 2020, section 4."""
    k: int = 8  # strong views of each unlabeled image, anchored to its weak view's guess (USB: 2)
    temperature: float = 0.5  # sharpening of the aligned guess
    alpha: float = 0.75  # MixUp's Beta(alpha, alpha)
    weight: float = 1.5  # lambda_U: the mixed unlabeled rows' cross-entropy, times ssl.lambda_u
    pre_mixup_weight: float = 0.5  # lambda_U1: the first strong view's, unmixed
    rotation_weight: float = 0.5  # lambda_r: the rotation head's
    rampup: float = 1 / 64  # the unlabeled weights' linear ramp-up, a fraction of train.steps

    def validate(self, check) -> None:
        check(1 <= self.k <= 16, "k", self.k, "1..16 strong views of each unlabeled image")
        check(self.temperature > 0, "temperature", self.temperature, "> 0")
        check(self.alpha >= 0, "alpha", self.alpha, ">= 0 (0: no MixUp)")
        for key in ("weight", "pre_mixup_weight", "rotation_weight"):
            check(getattr(self, key) >= 0, key, getattr(self, key), ">= 0")
        check(0.0 <= self.rampup <= 1.0, "rampup", self.rampup, "a fraction of train.steps, 0..1")


class ReMixMatch(Algorithm):
    name = "remixmatch"
    Config = ReMixMatchConfig
    uses_dist_align = True
    NEEDS = StepNeeds(views=("weak",) + views_of("strong", 8), with_grad=(), no_grad=("weak",))
    heads = {"rotation": 4}  # the 4-way rotation classifier on the pooled features (0, 90, 180, 270 degrees)

    def __init__(self, num_classes: int, **kw):
        super().__init__(num_classes, **kw)
        o = self.own
        self.k, self.temperature, self.alpha = o.k, o.temperature, o.alpha
        self.strong = views_of("strong", o.k)
        self.needs = StepNeeds(views=("weak",) + self.strong, with_grad=(), no_grad=("weak",))
        self._raw: list[torch.Tensor] = []

    def guess(self, logits_weak: torch.Tensor) -> torch.Tensor:
        """The weak view's softmax, aligned to p_target / p_model as of the step's start, sharpened."""
        probs = logits_weak.softmax(dim=1)
        self._raw.append(probs.detach())
        if self.da is not None:
            probs = self.da.align_with_current(probs)
        return sharpen(probs, self.temperature)

    def forward(self, inp):
        """Its own step: the weak view's guess, one gradient forward of the MixUp batch (with the first strong
        view unmixed), and the rotation head's forward of that view rotated."""
        return forward_mixed(inp, self.needs, self.mix, heads={"rotation": self.rotate})

    def mix(self, x_lb, y_lb, views, logits_u, generator):
        q = self.guess(logits_u["weak"]).detach()
        # the reference's augment([x] + [y[:, i] for i in range(K + 1)]): the weak view is mixed too
        inputs = torch.cat([x_lb] + [views[v] for v in self.strong] + [views["weak"]])
        targets = torch.cat([F.one_hot(y_lb, self.num_classes).float()] + [q] * (self.k + 1))
        mixed_inputs, mixed_targets, _, _ = mixup(inputs, targets, self.alpha, generator)
        # the first strong view, unmixed, rides in the same forward for the pre-mixup loss
        return torch.cat([mixed_inputs.to(x_lb.dtype), views[self.strong[0]]]), torch.cat([mixed_targets, q])

    def rotate(self, views, generator):
        x = views[self.strong[0]]
        quarters = torch.randint(0, 4, (x.shape[0],), generator=generator)
        return rotate_quarters(x, quarters), quarters.to(x.device)

    def loss(self, fw: Forwarded) -> tuple[torch.Tensor, dict]:
        n, u = fw.targets_x.shape[0], fw.logits_u["weak"].shape[0]
        logits, targets = fw.logits_x, fw.mixed_targets
        mixed_end = n + (self.k + 1) * u  # labeled, K strong and the weak rows, mixed
        loss_x = soft_cross_entropy(logits[:n], targets[:n])
        loss_u = soft_cross_entropy(logits[n:mixed_end], targets[n:mixed_end])
        loss_u1 = soft_cross_entropy(logits[mixed_end:], targets[mixed_end:])
        rot_logits, rot_targets = fw.head_logits.get("rotation"), fw.head_targets.get("rotation")
        loss_rot = (F.cross_entropy(rot_logits, rot_targets) if rot_logits is not None and rot_logits.shape[0]
                    else loss_x.new_zeros(()))
        ramp = linear_ramp(fw.step, fw.total_steps, self.own.rampup)
        w_u, w_u1 = self.lambda_u * self.own.weight * ramp, self.lambda_u * self.own.pre_mixup_weight * ramp
        loss = loss_x + w_u * loss_u + w_u1 * loss_u1 + self.own.rotation_weight * loss_rot
        stats = {"loss": loss.detach(), "loss_x": loss_x.detach(), "loss_u": loss_u.detach(),
                 "loss_u1": loss_u1.detach(), "loss_rot": loss_rot.detach(), "consistency_weight": w_u}
        if fw.true_u is not None:
            known = fw.true_u >= 0
            stats["pseudo_acc_all"] = share((targets[mixed_end:].argmax(dim=1) == fw.true_u) & known, known)
        return loss, stats

    @torch.no_grad()
    def end_step(self) -> None:
        """DA's p_model moves once per step with every rank's weak-view probabilities."""
        if self._raw and self.da is not None:
            self.da.update(torch.cat(self._raw))
        self._raw = []
