"""Parity with the authors' code: the model both sides forward, the batches, our step as the trainer runs it,
USB's step on the state as of the step's start, and the comparisons (tests/parity/).

Parity with the authors' code: every method USB (semilearn 0.3.2) also has, fed the same logits, labels,
sample ids and hyperparameters over several steps with state, gives the losses, masks or weights, targets
and state USB's own ``train_step`` and hooks give, to 1e-5.

Both sides forward one model (a linear map of 3 x 3 one-channel "images", no BatchNorm), ours through the
algorithm's own forward (distssl.ssl.step), USB's through its ``train_step`` (tests/support/usb.py
loads it). Where we depart from the authors by design, the test checks the departure by the formula
docs/algorithms.md states for it:
- the state a step reads: ours is the state as of the step's start, updated once after the step from the
  whole global batch; USB's hooks update first and mask with the updated state. Ours is compared with USB's
  step run on its state as of the step's start (its hooks' updates held back for that call, AtStepStart),
  and then USB's own update functions are applied to what that step saw: the states after each step match.
- the consistency methods' ramp: Laine & Aila's exp(-5 (1 - T)^2) where USB ramps linearly (T itself).
- Pi-Model's gradient reaches both views (the paper's); USB detaches the target.
Where USB itself departs from the paper, the test follows the paper and says so: USB's UDA never sharpens
(it asks for targets with ``softmax=False``, which returns the probabilities as they are), and its TSA tests
the largest probability, not the correct class's.
Temperature sharpening, MixUp's lambda' and permutation, and VAT's random start are drawn once and given to
both sides.
"""
import copy
import math

import numpy as np
import torch

from distssl.ssl.mixmatch import mixup
from distssl.ssl.step import StepInputs
from distssl.train.bnstats import BatchStatsSharing

C, SHAPE, STEPS = 5, (1, 3, 3), 4
TOL = dict(atol=1e-5, rtol=1e-5)


class Net(torch.nn.Module):
    """Logits = flatten(x) @ W, and a rotation head: a model with no BatchNorm, so the order and grouping of
    forwards cannot matter and any difference is the algorithms'."""

    def __init__(self, seed: int = 0, dtype=torch.float32):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        d = math.prod(SHAPE)
        self.w = torch.nn.Parameter((torch.randn(d, C, generator=g) * 2.5).to(dtype))  # confident, not all
        self.rot = torch.nn.Parameter(torch.randn(d, 4, generator=g).to(dtype))

    def forward(self, x, head=None):
        f = x.flatten(1)
        return f @ (self.rot if head == "rotation" else self.w)


class USBNet(torch.nn.Module):
    """The same parameters as USB's nets return them: a dict with logits and features (and ReMixMatch_Net's
    rotation logits with ``use_rot``)."""

    def __init__(self, net: Net):
        super().__init__()
        self.net = net

    def forward(self, x, use_rot=False, **kw):
        out = {"logits": self.net(x), "feat": x.flatten(1)}
        if use_rot:
            out["logits_rot"] = self.net(x, head="rotation")
        return out


def batch(seed: int, views=("weak", "strong"), n_lb: int = 8, n_ulb: int = 16, n_total: int = 40, dtype=torch.float32):
    g = torch.Generator().manual_seed(1000 + seed)
    out = {"x_lb": torch.randn(n_lb, *SHAPE, generator=g).to(dtype), "y_lb": torch.randint(0, C, (n_lb,), generator=g),
           "ids": torch.randperm(n_total, generator=g)[:n_ulb]}
    for v in views:
        out[v] = torch.randn(n_ulb, *SHAPE, generator=g).to(dtype)
    return out


def ours_step(algo, net: Net, b: dict, step: int, total: int, ema=None, generator=None):
    """One step of ours as the trainer runs it: the algorithm's own forward of the micro-batch, its loss,
    end_step."""
    inp = StepInputs(model=net, module=net, x_lb=b["x_lb"], y_lb=b["y_lb"], views={v: b[v] for v in algo.needs.views},
                     bn_sharing=BatchStatsSharing(net), ema=ema, ids=b["ids"], step=step, total_steps=total,
                     generator=generator)
    loss, stats = algo.loss(algo.forward(inp))
    algo.end_step()
    return loss, stats


class AtStepStart:
    """USB's step run on its state as of the step's start, as ours runs: a copy of the algorithm whose hooks'
    named updates only record what they are given, so its ``train_step`` masks, weighs and aligns with the state
    as it stood; then :meth:`commit` applies USB's own update functions to what that step saw, on the original.
    (On the first step USB's DA has no p_model yet: ours aligns nothing then, which p_model = p_target gives.)"""

    def __init__(self, alg, *updates: tuple[str, str]):
        self.alg, self.updates, self.seen = alg, updates, {}
        self.frozen = copy.deepcopy(alg)
        for hook, method in updates:
            setattr(self.frozen.hooks_dict[hook], method,
                    lambda algorithm, *a, _key=(hook, method), **k: self.seen.setdefault(_key, (a, k)))
        masking = self.frozen.hooks_dict.get("MaskingHook")
        for name in ("p_model", "label_hist", "time_p"):  # FreeMatch's update publishes its state on the algorithm
            if hasattr(masking, name):
                setattr(self.frozen, name, getattr(masking, name))
        dist_align = self.frozen.hooks_dict.get("DistAlignHook")
        if dist_align is not None and dist_align.p_model is None:
            target = dist_align.p_target
            dist_align.p_model = target.mean(dim=0) if target.dim() > 1 else target

    def train_step(self, *args):
        return self.frozen.train_step(*args)

    def commit(self) -> None:
        for hook, method in self.updates:
            a, k = self.seen[(hook, method)]
            target = self.alg.hooks_dict[hook]
            getattr(type(target), method)(target, self.alg, *a, **k)


def close(a, b) -> bool:
    return torch.allclose(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64), **TOL)


def losses(log: dict) -> tuple[float, float, float]:
    return log["train/total_loss"], log["train/sup_loss"], log["train/unsup_loss"]


def assert_losses(ours: tuple, stats: dict, log: dict, what: str):
    loss = ours
    total, sup, unsup = losses(log)
    assert close(loss, total), f"{what}: total loss {float(loss)} != USB {total}"
    assert close(stats["loss_x"], sup), f"{what}: labeled loss {float(stats['loss_x'])} != USB {sup}"
    assert close(stats["loss_u"], unsup), f"{what}: unlabeled loss {float(stats['loss_u'])} != USB {unsup}"




def usb_ramp(log: dict, lambda_u: float) -> float:
    """USB's linear warm-up as its own step applied it: (total - sup - extra) / (lambda_u * unsup)."""
    total, sup, unsup = losses(log)
    return (total - sup - log.get("extra", 0.0)) / (lambda_u * unsup)


def laine_aila(linear: float) -> float:
    return math.exp(-5 * (1 - linear) ** 2)


def shared_mixup(monkeypatch, generator: torch.Generator, rows: int, alpha: float):
    """The lambda' and permutation our ``mixup`` will draw from ``generator`` for ``rows`` rows, given to USB's
    ``mixup_one_target`` (np.random.beta and torch.randperm) for its next call; ``generator`` is left as it was."""
    replay = torch.Generator().set_state(generator.get_state())
    _, _, lam, perm = mixup(torch.zeros(rows, 1), torch.zeros(rows, 1), alpha, replay)
    monkeypatch.setattr(np.random, "beta", lambda a, b: lam)  # lam >= 0.5 already: max(lam, 1 - lam) = lam
    real_randperm = torch.randperm
    monkeypatch.setattr(torch, "randperm", lambda n, *a, **k: perm.clone() if n == rows else real_randperm(n, *a, **k))
    return replay
