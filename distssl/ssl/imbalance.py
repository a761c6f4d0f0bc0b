"""Long tails: a class-balancing component any pseudo-label rule can use (``ssl.imbalance``).

Both methods keep a second classifier (the ``balanced`` head, on the pooled features) trained to be fair to the
rare classes, and that head is the one the run evaluates and exports (its weights become the timm classifier).

- **ABC** (Lee et al., NeurIPS 2021, "ABC: Auxiliary Balanced Classifier for Class-imbalanced Semi-supervised
  Learning"; USB's ``imb_algorithms/abc``): the auxiliary head is trained with a class-balanced mask. A labelled
  sample of class y counts with probability min_c n_c / n_y; an unlabelled one whose auxiliary weak prediction y'
  is confident (>= 0.95) counts, on its strong view, with probability 1 - t (1 - min_c n_c / n_y'), t the share
  of the run done.
- **ACR** (Wei & Gan, CVPR 2023, "Towards Realistic Long-Tailed Semi-Supervised Learning: Consistency Is All
  You Need"; the authors' ``train.py``): the balanced head learns with the logit-adjusted loss
  CE(z + tau2 log pi, y) (pi: the labelled class shares) and is pseudo-labelled by the weak view's adjusted logits
  z - tau12 log pi. The classifier's own pseudo-labels are adjusted too, by tau log pi, where tau adapts to the
  unlabelled set: its class distribution is estimated from the balanced head's confident predictions (an EMA,
  0.9), compared (symmetric KL) with the labelled one, uniform and the reversed labelled one, and
  tau = tau1 x (the softmax of those three divergences)'s first entry: near tau1 when the unlabelled mix looks
  unlike the labelled one, near 0 when it looks the same. A sample's pseudo-label counts where either its
  adjusted or its raw prediction is confident.

The unlabelled set's class mix, estimated, is also what ``ssl.dist_align_target=estimated`` aligns towards
(:func:`em_prior_step`, Saerens et al. 2002's EM for a shifted prior).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class ABCConfig:
    """ssl.abc: ABC's keys (ssl.imbalance=abc); defaults: USB's."""
    p_cutoff: float = 0.95  # the auxiliary head's confidence for an unlabelled sample to count
    weight: float = 1.0  # weight of the auxiliary loss (USB's abc_loss_ratio)

    def validate(self, check) -> None:
        check(0.0 < self.p_cutoff <= 1.0, "p_cutoff", self.p_cutoff, "0 < p <= 1")
        check(self.weight >= 0, "weight", self.weight, ">= 0")


@dataclass
class ACRConfig:
    """ssl.acr: ACR's keys (ssl.imbalance=acr); defaults: the authors' CIFAR-10-LT settings."""
    tau1: float = 2.0  # the largest adjustment of the classifier's pseudo-labels (tau adapts in 0..tau1)
    tau12: float = 2.0  # the adjustment of the balanced head's pseudo-labels
    tau2: float = 2.0  # the logit adjustment of the balanced head's labelled loss
    ema_u: float = 0.9  # momentum of the unlabelled class distribution's estimate
    # the authors' run: 500 "epochs" of 500 steps, estimating from epoch 6 on, tau updated once an epoch
    estimate_from: float = 6 / 500  # share of the run before the estimate starts
    update_every: float = 1 / 500  # share of the run between two updates of tau

    def validate(self, check) -> None:
        for key in ("tau1", "tau12", "tau2"):
            check(getattr(self, key) >= 0, key, getattr(self, key), ">= 0")
        check(0.0 <= self.ema_u < 1.0, "ema_u", self.ema_u, "0 <= m < 1")
        check(0.0 <= self.estimate_from < 1.0, "estimate_from", self.estimate_from, "0 <= share < 1")
        check(0.0 < self.update_every <= 1.0, "update_every", self.update_every, "0 < share <= 1")


def class_shares(histogram) -> torch.Tensor:
    """The labelled set's class shares; a class without labels counts as 1e-3 of one (its log stays finite)."""
    h = torch.as_tensor(histogram, dtype=torch.float64).clamp_min(1e-3)
    return (h / h.sum()).float()


# -- ABC --
def abc_keep_labeled(histogram) -> torch.Tensor:
    """Per class, the probability a labelled sample of it counts: min_c n_c / n_y (1 for the rarest class)."""
    h = torch.as_tensor(histogram, dtype=torch.float64).clamp_min(1.0)
    return (h.min() / h).float()


def abc_keep_unlabeled(keep_labeled: torch.Tensor, progress: float) -> torch.Tensor:
    """Per predicted class, the probability an unlabelled sample counts: 1 - t (1 - keep_labeled), t in 0..1."""
    return 1.0 - progress * (1.0 - keep_labeled)


def abc_loss(logits_x: torch.Tensor, y: torch.Tensor, draws_x: torch.Tensor, weak: torch.Tensor,
             strong: torch.Tensor, draws_u: torch.Tensor, keep_labeled: torch.Tensor, progress: float,
             p_cutoff: float) -> tuple[torch.Tensor, torch.Tensor]:
    """ABC's auxiliary loss (USB's ``compute_abc_loss``), the Bernoulli masks drawn from the uniform ``draws_*``
    (one per sample: kept where draw < p). Returns (loss, the unlabelled mask)."""
    keep = keep_labeled.to(logits_x.device)
    mask_x = (draws_x.to(logits_x.device) < keep[y]).float()
    loss_x = (F.cross_entropy(logits_x, y, reduction="none") * mask_x).mean()
    if strong.shape[0] == 0:
        return loss_x, strong.new_zeros(0)
    with torch.no_grad():
        conf, pseudo = weak.detach().softmax(dim=1).max(dim=1)
        p = abc_keep_unlabeled(keep, progress)[pseudo]
        mask_u = ((conf >= p_cutoff) & (draws_u.to(p.device) < p)).float()
    loss_u = (F.cross_entropy(strong, pseudo, reduction="none") * mask_u).mean()
    return loss_x + loss_u, mask_u


# -- ACR --
def adjustment(shares: torch.Tensor, tau: float) -> torch.Tensor:
    """log(pi^tau + 1e-12), the authors' ``compute_adjustment_by_py``."""
    return torch.log(shares.double() ** tau + 1e-12).float()


def adjusted_probs(logits: torch.Tensor, adj: torch.Tensor) -> torch.Tensor:
    return torch.softmax(logits - adj.to(logits.device), dim=1)


def symmetric_kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """0.5 KL(p || q) + 0.5 KL(q || p), as the authors' two nn.KLDivLoss(reduction='sum') calls."""
    p, q = p.double(), q.double()
    return 0.5 * (p * (p.log() - q.log())).sum() + 0.5 * (q * (q.log() - p.log())).sum()


def acr_divergences(estimate: torch.Tensor, labeled: torch.Tensor) -> torch.Tensor:
    """Symmetric KL of the unlabelled estimate from (the labelled shares, uniform, the labelled shares reversed)."""
    uniform = torch.full_like(labeled, 1.0 / labeled.numel())
    return torch.stack([symmetric_kl(labeled, estimate), symmetric_kl(uniform, estimate),
                        symmetric_kl(labeled.flip(0), estimate)])


def acr_tau(mean_divergences: torch.Tensor, tau_max: float, tau_min: float = 0.0) -> float:
    """tau_min + (tau_max - tau_min) softmax(divergences)[0]: large when the unlabelled mix is far from the labelled."""
    w = torch.softmax(mean_divergences.double(), dim=0)[0].item()
    return tau_min + (tau_max - tau_min) * w if not math.isnan(w) else float("nan")


def acr_balanced_loss(logits_x_b: torch.Tensor, y: torch.Tensor, weak: torch.Tensor, weak_b: torch.Tensor,
                      strong_b: torch.Tensor, shares: torch.Tensor, tau12: float, tau2: float, threshold: float
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """The balanced head's two terms: CE(z_b + tau2 log pi, y) on the labelled batch, and CE(strong_b, argmax of
    softmax(weak - tau12 log pi)) where that or the balanced head's own weak prediction is confident.
    Returns (loss, the balanced head's confident mask, which estimates the unlabelled mix)."""
    loss_x = F.cross_entropy(logits_x_b + adjustment(shares, tau2).to(logits_x_b.device), y)
    if strong_b.shape[0] == 0:
        return loss_x, strong_b.new_zeros(0, dtype=torch.bool)
    with torch.no_grad():
        conf_h2, pseudo_h2 = adjusted_probs(weak.detach(), adjustment(shares, tau12)).max(dim=1)
        conf_b = weak_b.detach().softmax(dim=1).max(dim=1).values
        mask_b = conf_b >= threshold
        mask = (mask_b | (conf_h2 >= threshold)).float()
    loss_u = (F.cross_entropy(strong_b, pseudo_h2, reduction="none") * mask).mean()
    return loss_x + loss_u, mask_b


def em_prior_step(probs: torch.Tensor, prior: torch.Tensor, train_prior: torch.Tensor) -> torch.Tensor:
    """One EM step for the unlabelled class prior (Saerens et al. 2002): each posterior reweighted by
    prior / train_prior and renormalised, then averaged."""
    w = probs.double() * (prior.double() / train_prior.double()).to(probs.device)
    w = w / w.sum(dim=1, keepdim=True).clamp_min(1e-12)
    return w.mean(dim=0).float()
