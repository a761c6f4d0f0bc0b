"""Virtual Adversarial Training (Miyato et al. 2018, "Virtual Adversarial Training: A Regularization
Method for Supervised and Semi-Supervised Learning").

The consistency term is KL(p(x) || p(x + r_adv)), p(x) a constant target, at the direction r_adv in
which a perturbation of norm ``eps`` changes the prediction most: found by power iteration from a
random unit direction d, d <- grad_d KL(p(x) || p(x + xi d)) (one extra forward and a backward with
respect to the input per iteration; the weights' gradients are not touched), then one forward at
x + eps d / |d|. With ``entropy_weight`` > 0 the entropy of p(x) is minimised too (the paper's
VAT + EntMin). The random start is drawn per sample from (run.seed, step, sample id), so it does not
depend on the world size. Perturbed forwards normalise with their own batch's BatchNorm
statistics and leave the running ones alone (distssl/train/forward.py).

eps is the perturbation's L2 norm over the normalised image (data.mean / data.std applied), as the
paper measures it on its inputs; its size per element is eps / sqrt(C H W). The paper's MNIST eps 2
on [0, 1] pixels of 28 x 28 is 2 / 28 = 0.071 a pixel; on the demo's 3 x 32 x 32 inputs normalised by std
0.25 the same per-pixel size is eps 16, and its CIFAR-10 eps 6 (on ZCA-whitened inputs) about 7. On
the demo (2 ranks, 400 steps, resumed at 200) eps 6 lost 2.2 points to the supervised baseline, 16
gained 3.3 and 32 to 64 gained 8.6 to 9.3 (docs/benchmarks.md): the default is 32, twice the paper's
MNIST size a pixel. At another resolution keep the size a pixel: scale eps by sqrt(pixels), e.g. x7
from 32 px to 224 px. Other defaults: xi 1e-6 and one power iteration (the paper's), weight 0.3,
entropy_weight 0.06 and ramp-up over 0.4 of the run (USB's VAT on CIFAR). Under bf16 or fp16, xi 1e-6
is below the inputs' resolution: raise it (1e-2 is still small against eps).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from distssl.ssl.algorithm import Consistency, RampedConfig, StepNeeds, forward_views, random_directions


def kl_with_logits(target_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax(target) || softmax(logits)), averaged over samples."""
    q = target_logits.softmax(dim=1)
    return (q * (F.log_softmax(target_logits, dim=1) - F.log_softmax(logits, dim=1))).sum(dim=1).mean()


def entropy(logits: torch.Tensor) -> torch.Tensor:
    return -(logits.softmax(dim=1) * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


def unit(d: torch.Tensor) -> torch.Tensor:
    """Each sample's direction scaled to L2 norm 1."""
    return d / (d.flatten(1).norm(dim=1).view(-1, *[1] * (d.dim() - 1)) + 1e-16)


def adversarial_direction(perturbed, x: torch.Tensor, target_logits: torch.Tensor, d: torch.Tensor,
                          xi: float, iterations: int) -> torch.Tensor:
    """Power iteration for the direction of largest KL change; returns it with unit norm."""
    target_logits = target_logits.detach()
    x = x.detach()
    for _ in range(iterations):
        d = (xi * unit(d)).requires_grad_(True)
        kl = kl_with_logits(target_logits, perturbed(x + d.to(x.dtype)))
        d = torch.autograd.grad(kl, d)[0].detach()
    return unit(d)


@dataclass
class VATConfig(RampedConfig):
    """Miyato et al. 2018: KL consistency at the adversarial direction found by power iteration."""
    weight: float = 0.3  # consistency weight (USB's VAT)
    # L2 norm of the adversarial perturbation over the normalised image: 2x the paper's MNIST size a pixel
    # at 3 x 32 x 32 (see the module's note); scale by sqrt(pixels) at other resolutions
    eps: float = 32.0
    xi: float = 1e-6  # finite-difference step of the power iteration (the paper's); ~1e-2 under bf16/fp16
    power_iterations: int = 1  # the paper's
    entropy_weight: float = 0.06  # entropy minimisation of the unlabeled predictions (USB's; 0 = plain VAT)

    def validate(self, check) -> None:
        super().validate(check)
        check(self.eps > 0, "eps", self.eps, "> 0")
        check(self.xi > 0, "xi", self.xi, "> 0")
        check(self.power_iterations >= 1, "power_iterations", self.power_iterations, ">= 1")
        check(self.entropy_weight >= 0, "entropy_weight", self.entropy_weight, ">= 0")


class VAT(Consistency):
    name = "vat"
    Config = VATConfig
    NEEDS = StepNeeds(views=("weak",), with_grad=("weak",), no_grad=())

    def forward(self, inp):
        """The default step, with the forwards of perturbed inputs VAT makes itself (``perturbed``, ``probe``)."""
        return forward_views(inp, self.needs, perturbs=True)

    def __init__(self, num_classes: int, **kw):
        super().__init__(num_classes, **kw)
        o = self.own
        self.eps, self.xi, self.iterations, self.entropy_weight = o.eps, o.xi, o.power_iterations, o.entropy_weight

    def consistency(self, fw):
        logits, x = fw.logits_u["weak"], fw.inputs_u["weak"]
        ids = fw.ids if fw.ids is not None else torch.arange(x.shape[0])
        d0 = random_directions(x.shape, ids, fw.seed, fw.step).to(x.device, torch.float32)
        direction = adversarial_direction(fw.probe or fw.perturbed, x, logits, d0, self.xi, self.iterations)
        r_adv = (self.eps * direction).to(x.dtype)
        loss_vat = kl_with_logits(logits.detach(), fw.perturbed(x.detach() + r_adv))
        ent = entropy(logits)
        return (loss_vat, self.entropy_weight * ent, logits.detach().argmax(dim=1),
                {"loss_entropy": ent.detach()})
