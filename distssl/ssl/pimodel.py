"""Pi-Model (Laine & Aila 2017, "Temporal Ensembling for Semi-Supervised Learning", section 2.1).

Two stochastic views of each unlabeled image, both forwarded with gradient (the paper: "both
branches get gradients"), and the mean squared difference of their softmax outputs as the
consistency term, weighted by w(t) = weight * exp(-5 (1 - T)^2) over the first ``rampup`` fraction of
train.steps. Both views are the weak augmentation (flip and translation, the paper's), drawn twice.
Defaults: weight 100 (the paper's w_max; USB's is 10; on the demo Pi-Model gains the least of the
family: 4.7 points over supervised on three seeds of straight runs, 3.5 to 6.7 resumed at half way:
docs/benchmarks.md), ramp-up over 0.4 of the run (USB's unsup_warm_up; the paper ramps over its
first 80 of 300 epochs); the paper's Gaussian input noise is ``noise``, off.
``augment=strong`` trains the second view with RandAugment + Cutout; with both views carrying
gradient that lost 9 points on the demo.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from distssl.ssl.algorithm import Consistency, RampedConfig, StepNeeds, forward_views, second_view, softmax_mse


@dataclass
class PiModelConfig(RampedConfig):
    """Laine & Aila 2017: two weak views, both with gradient, MSE between their softmax outputs."""
    weight: float = 100.0  # consistency weight w_max (the paper's; USB's is 10)
    # the view trained with gradient: another weak one (the paper's), or the strong one (RandAugment + Cutout)
    augment: Literal["weak", "strong"] = "weak"
    # sigma of Gaussian noise on each view's normalised input (the paper's 0.15 with its augmentation;
    # off: 0.15 lost 3 points on the demo, 4.7 below supervised: docs/benchmarks.md)
    noise: float = 0.0

    def validate(self, check) -> None:
        super().validate(check)
        check(self.noise >= 0, "noise", self.noise, ">= 0")


class PiModel(Consistency):
    name = "pimodel"
    Config = PiModelConfig
    NEEDS = StepNeeds(views=("weak", "weak_2"), with_grad=("weak", "weak_2"), no_grad=())

    def __init__(self, num_classes: int, **kw):
        super().__init__(num_classes, **kw)
        self.second = second_view(self.own.augment)
        self.needs = StepNeeds(views=("weak", self.second), with_grad=("weak", self.second), no_grad=())

    def forward(self, inp):
        """The default step, with the paper's Gaussian input noise (``noise``) on both views."""
        return forward_views(inp, self.needs, input_noise=self.own.noise)

    def consistency(self, fw):
        a, b = fw.logits_u["weak"], fw.logits_u[self.second]
        return softmax_mse(a, b.softmax(dim=1)), a.new_zeros(()), a.detach().argmax(dim=1), {}
