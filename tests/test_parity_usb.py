"""Parity with the authors' code: every method USB (semilearn 0.3.2) also has, fed the same logits, labels,
sample ids and hyperparameters over several steps with state, gives the losses, masks or weights, targets
and state USB's own ``train_step`` and hooks give, to 1e-5.

Both sides forward one model (a linear map of 3 x 3 one-channel "images", no BatchNorm), ours through the
engine's own forward functions (distssl.train.forward), USB's through its ``train_step`` (tests/support/usb.py
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
import functools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from distssl.ssl.distalign import DistributionAlignment, target_from_histogram
from distssl.ssl.fixmatch import FixMatch
from distssl.ssl.flexmatch import FlexMatch
from distssl.ssl.freematch import FreeMatch, fairness_loss
from distssl.ssl.meanteacher import MeanTeacher
from distssl.ssl.mixmatch import MixMatch, mixup
from distssl.ssl.pimodel import PiModel
from distssl.ssl.remixmatch import ReMixMatch, rotate_quarters
from distssl.ssl.softmatch import SoftMatch
from distssl.ssl.uda import UDA
from distssl.ssl.vat import VAT
from distssl.train.bnstats import BatchStatsSharing
from distssl.train.ema import EMA
from distssl.train.forward import forward_mixed, forward_views
from support import usb

C, SHAPE, STEPS = 5, (1, 3, 3), 4
TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def ref() -> usb.Reference:
    return usb.load(usb.source_dir())


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
    """One step of ours as the trainer runs it: forward what the algorithm needs, its loss, end_step."""
    needs, bn = algo.needs, BatchStatsSharing(net)
    views = {v: b[v] for v in needs.views}
    if needs.mixes:
        fw = forward_mixed(net, needs, b["x_lb"], b["y_lb"], views, algo.mix, bn, generator,
                           algo.rotate if needs.rotation else None)
    else:
        fw = forward_views(net, needs, b["x_lb"], views, weak_forward="shared_bn", bn_sharing=bn, ema=ema, module=net)
    fw.targets_x, fw.ids, fw.step, fw.total_steps = b["y_lb"], b["ids"], step, total
    loss, stats = algo.loss(fw)
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


# --- the pseudo-label rules ---------------------------------------------------------------------------

def test_parity_fixmatch(ref):
    net = Net()
    ours = FixMatch(C, tau=0.95, lambda_u=1.0)
    theirs = ref.make("fixmatch", num_classes=C, model=USBNet(net), p_cutoff=0.95, T=0.5, use_hard_label=True)
    rates = []
    for t in range(STEPS):
        b = batch(t)
        loss, stats = ours_step(ours, net, b, t, 100)
        _, log = theirs.train_step(b["x_lb"], b["y_lb"], b["weak"], b["strong"])
        assert_losses(loss, stats, log, f"step {t}")
        assert close(stats["mask_rate"], log["train/util_ratio"])
        rates.append(log["train/util_ratio"])
    assert 0 < min(rates) and max(rates) < 1  # the threshold separates: the masks were compared, not all-or-none


def test_parity_fixmatch_with_distribution_alignment(ref):
    """FixMatch + DA: USB's DistAlignEMAHook (p_target the labeled distribution, as ReMixMatch) on its FixMatch."""
    net, m = Net(), 0.7
    hist = torch.tensor([3.0, 1, 2, 2, 4])
    da = DistributionAlignment(C, momentum=m, p_target=target_from_histogram(hist))
    ours = FixMatch(C, tau=0.95, lambda_u=1.0, da=da)
    theirs = ref.make("fixmatch", num_classes=C, model=USBNet(net), p_cutoff=0.95, T=0.5, use_hard_label=True)
    theirs.register_hook(ref.hooks.DistAlignEMAHook(num_classes=C, momentum=m, p_target_type="gt",
                                                    p_target=hist / hist.sum()), "DistAlignHook")
    for t in range(STEPS):
        b = batch(t)
        step = AtStepStart(theirs, ("DistAlignHook", "update_p"))
        _, log = step.train_step(b["x_lb"], b["y_lb"], b["weak"], b["strong"])
        loss, stats = ours_step(ours, net, b, t, 100)
        assert_losses(loss, stats, log, f"step {t}")
        assert close(stats["mask_rate"], log["train/util_ratio"])
        step.commit()
        assert close(ours.da.p_model, theirs.hooks_dict["DistAlignHook"].p_model), f"p_model after step {t}"


@pytest.mark.parametrize("warmup", [True, False])
def test_parity_flexmatch(ref, warmup):
    """No departure: USB's FlexMatch masks with the status as of the step's start too."""
    net, n = Net(), 40
    ours = FlexMatch(C, tau=0.95, lambda_u=1.0, num_unlabeled=n, warmup=warmup)
    theirs = ref.make("flexmatch", num_classes=C, model=USBNet(net), p_cutoff=0.95, T=0.5, use_hard_label=True,
                      args={"ulb_dest_len": n, "thresh_warmup": warmup})
    for t in range(STEPS + 2):
        b = batch(t, n_total=n)
        loss, stats = ours_step(ours, net, b, t, 100)
        _, log = theirs.train_step(b["x_lb"], b["y_lb"], b["ids"], b["weak"], b["strong"])
        assert_losses(loss, stats, log, f"step {t}")
        assert close(stats["mask_rate"], log["train/util_ratio"])
        hook = theirs.hooks_dict["MaskingHook"]
        assert torch.equal(ours.status, hook.selected_label), f"learning status after step {t}"
        acc = hook.classwise_acc
        assert close(ours.thresholds, 0.95 * acc / (2 - acc)), f"class thresholds after step {t}"
    assert (ours.status >= 0).any() and (ours.status < 0).any()


def test_parity_freematch(ref):
    net, m = Net(), 0.7
    ours = FreeMatch(C, tau=0.95, lambda_u=1.0, momentum=m, fairness_weight=0.01)
    theirs = ref.make("freematch", num_classes=C, model=USBNet(net), T=0.5, use_hard_label=True, ema_p=m,
                      use_quantile=False, clip_thresh=False, lambda_e=0.01, args={"ema_p": m})
    for t in range(STEPS):
        b = batch(t)
        step = AtStepStart(theirs, ("MaskingHook", "update"))
        _, log = step.train_step(b["x_lb"], b["y_lb"], b["weak"], b["strong"])
        hook = step.frozen.hooks_dict["MaskingHook"]
        loss, stats = ours_step(ours, net, b, t, 100)
        assert_losses(loss, stats, log, f"step {t}")
        assert close(stats["mask_rate"], log["train/util_ratio"])
        if "loss_fair" in stats:  # the fairness term alone, against USB's entropy_loss on the same state
            mask = (b["weak"].flatten(1) @ net.w).softmax(1).max(1).values.ge(
                hook.time_p * (hook.p_model / hook.p_model.max())[(b["weak"].flatten(1) @ net.w).argmax(1)]).float()
            want, _ = ref.freematch.entropy_loss(mask, (b["strong"].flatten(1) @ net.w), hook.p_model, hook.label_hist)
            assert close(stats["loss_fair"], want)
        step.commit()
        state = theirs.hooks_dict["MaskingHook"]
        assert close(ours.time_p, state.time_p) and close(ours.p_model, state.p_model), f"thresholds after step {t}"
        assert close(ours.label_hist, state.label_hist), f"label histogram after step {t}"


def test_parity_freematch_fairness_when_a_class_was_never_predicted(ref):
    """A zero in the EMA histogram (momentum 0, or underflow): the class leaves the target, as in USB."""
    g = torch.Generator().manual_seed(3)
    logits_s, mask = torch.randn(12, C, generator=g) * 3, (torch.rand(12, generator=g) > 0.3).float()
    p_model = torch.softmax(torch.randn(C, generator=g), 0)
    label_hist = torch.tensor([0.4, 0.0, 0.3, 0.3, 0.0])
    want, _ = ref.freematch.entropy_loss(mask, logits_s, p_model, label_hist)
    assert close(fairness_loss(logits_s, mask, p_model, label_hist), want)


def test_parity_softmatch(ref):
    """SoftMatch with uniform alignment (USB's defaults): the weights from the aligned probabilities, the
    pseudo-labels from the raw ones; mean and variance, and DA's p_model, move with the same momentum."""
    net, m = Net(), 0.7
    ours = SoftMatch(C, tau=0.95, lambda_u=1.0, momentum=m, n_sigma=2.0, da=DistributionAlignment(C, momentum=m))
    theirs = ref.make("softmatch", num_classes=C, model=USBNet(net), T=0.5, use_hard_label=True, ema_p=m,
                      args={"ema_p": m, "n_sigma": 2, "per_class": False, "dist_uniform": True})
    relabelled = 0
    for t in range(STEPS):
        b = batch(t)
        step = AtStepStart(theirs, ("MaskingHook", "update"), ("DistAlignHook", "update_p"))
        _, log = step.train_step(b["x_lb"], b["y_lb"], b["weak"], b["strong"])
        if ours.da.p_model is not None:  # samples whose aligned argmax is not their raw one: the labels differ
            raw = (b["weak"].flatten(1) @ net.w).softmax(1)
            relabelled += int((ours.da.align_with_current(raw).argmax(1) != raw.argmax(1)).sum())
        loss, stats = ours_step(ours, net, b, t, 100)
        assert_losses(loss, stats, log, f"step {t}")
        assert close(stats["weight_mean"], log["train/util_ratio"])  # USB logs the mean weight as util_ratio
        step.commit()
        hook = theirs.hooks_dict["MaskingHook"]
        assert close(ours.mu, hook.prob_max_mu_t) and close(ours.var, hook.prob_max_var_t), f"mu, var after step {t}"
        assert close(ours.da.p_model, theirs.hooks_dict["DistAlignHook"].p_model), f"p_model after step {t}"
    assert relabelled > 0  # alignment moved some argmax: labels from the aligned probabilities would differ


def paper_sharpen(p: torch.Tensor, temperature: float) -> torch.Tensor:
    """UDA's sharpening as its paper writes it (Xie et al. 2020, section 3.2): softmax(z / T), i.e. p^(1/T)
    renormalised."""
    q = p ** (1 / temperature)
    return q / q.sum(dim=-1, keepdim=True)


def test_parity_uda(ref, monkeypatch):
    """USB's UDA never sharpens: it asks for targets with softmax=False, which returns the probabilities as
    they are, whatever T. The test follows the paper: USB's pseudo-label hook given the paper's sharpening."""
    net = Net()
    ours = UDA(C, tau=0.95, lambda_u=1.0, temperature=0.4, threshold=0.8, tsa="none")
    theirs = ref.make("uda", num_classes=C, model=USBNet(net), T=0.4, p_cutoff=0.8, tsa_schedule="none")
    hook = theirs.hooks_dict["PseudoLabelingHook"]
    usb_targets = hook.gen_ulb_targets
    monkeypatch.setattr(hook, "gen_ulb_targets", lambda alg, logits, use_hard_label=True, T=1.0, softmax=True, **k:
                        paper_sharpen(usb_targets(alg, logits, use_hard_label, T, softmax, **k), T))
    for t in range(STEPS):
        b = batch(t)
        loss, stats = ours_step(ours, net, b, t, 100)
        _, log = theirs.train_step(b["x_lb"], b["y_lb"], b["weak"], b["strong"])
        assert_losses(loss, stats, log, f"step {t}")
        assert close(stats["mask_rate"], log["train/util_ratio"])


@pytest.mark.parametrize("schedule", ["linear", "log", "exp"])
def test_parity_uda_training_signal_annealing_follows_the_papers_code(schedule):
    """TSA as google-research/uda's main.py has it: a labeled sample leaves the loss when the probability of
    its *correct* class exceeds eta_t, and the kept samples' loss is summed and divided by their count (at
    least 1). USB tests the largest probability and averages over the whole batch; the paper's code is followed."""
    g = torch.Generator().manual_seed(5)
    logits, y = torch.randn(16, C, generator=g) * 3, torch.randint(0, C, (16,), generator=g)
    ours = UDA(C, tau=0.95, lambda_u=1.0, tsa=schedule)
    for step in (0, 30, 70, 100):
        t = step / 100
        alpha = {"linear": t, "log": 1 - math.exp(-5 * t), "exp": math.exp(5 * (t - 1))}[schedule]
        eta = alpha * (1 - 1 / C) + 1 / C
        correct = logits.softmax(1).gather(1, y[:, None]).squeeze(1)
        keep = (correct <= eta).float()
        want = (F.cross_entropy(logits, y, reduction="none") * keep).sum() / keep.sum().clamp_min(1)
        loss, _ = ours.labeled_loss(logits, y, step, 100)
        assert close(loss, want)


# --- the consistency methods --------------------------------------------------------------------------

def usb_ramp(log: dict, lambda_u: float) -> float:
    """USB's linear warm-up as its own step applied it: (total - sup - extra) / (lambda_u * unsup)."""
    total, sup, unsup = losses(log)
    return (total - sup - log.get("extra", 0.0)) / (lambda_u * unsup)


def laine_aila(linear: float) -> float:
    return math.exp(-5 * (1 - linear) ** 2)


@pytest.mark.parametrize("it", [30, 60])  # inside USB's 0.4 x 100-step warm-up, then past it
def test_parity_pimodel(ref, it):
    net, weight = Net(), 10.0
    ours = PiModel(C, tau=0.95, lambda_u=1.0, weight=weight, rampup=0.4)
    theirs = ref.make("pimodel", num_classes=C, model=USBNet(net), lambda_u=weight, it=it, num_train_iter=100,
                      unsup_warm_up=0.4)
    b = batch(it, views=("weak", "weak_2"))
    loss, stats = ours_step(ours, net, b, it, 100)
    _, log = theirs.train_step(b["x_lb"], b["y_lb"], b["weak"], b["weak_2"])
    assert close(stats["loss_x"], log["train/sup_loss"]) and close(stats["loss_u"], log["train/unsup_loss"])
    linear = usb_ramp(log, weight)
    assert close(linear, min(1.0, it / 40))
    assert close(stats["consistency_weight"], weight * laine_aila(linear))  # the ramp's shape: a departure
    assert close(loss, stats["loss_x"] + weight * laine_aila(linear) * stats["loss_u"])


def test_parity_pimodel_gradient_reaches_both_views():
    """The departure in the gradient: the paper's Pi-Model trains both branches ("both branches get
    gradients"); USB detaches the weak view's softmax. d loss / d logits of each view, by the formula."""
    algo = PiModel(C, tau=0.95, lambda_u=1.0, weight=1.0, rampup=0.0)
    g = torch.Generator().manual_seed(2)
    a, b_ = torch.randn(6, C, generator=g, requires_grad=True), torch.randn(6, C, generator=g, requires_grad=True)
    from distssl.ssl.algorithm import Forwarded

    fw = Forwarded(logits_x=torch.zeros(1, C), targets_x=torch.tensor([0]), logits_u={"weak": a, "weak_2": b_})
    algo.consistency(fw)[0].backward()
    ga, gb = a.grad.clone(), b_.grad.clone()
    a2, b2 = a.detach().requires_grad_(), b_.detach().requires_grad_()
    F.mse_loss(a2.softmax(1), b2.softmax(1)).backward()  # the paper: both softmaxes carry gradient
    assert torch.allclose(ga, a2.grad) and torch.allclose(gb, b2.grad) and gb.abs().sum() > 0


@pytest.mark.parametrize("it", [30, 60])
def test_parity_meanteacher(ref, it):
    """The teacher is the EMA weights (ours: distssl.train.ema swapped in; USB: ema.apply_shadow)."""
    net, weight = Net(), 50.0
    ema = EMA(net, decay=0.9, warmup=False)
    ema.shadow["w"] = net.w.detach() + 0.3 * torch.randn(net.w.shape, generator=torch.Generator().manual_seed(9))

    class USBEma:  # USB's EMA object as Mean Teacher calls it
        def apply_shadow(self):
            self.saved = net.w.detach().clone()
            net.w.data.copy_(ema.shadow["w"])

        def restore(self):
            net.w.data.copy_(self.saved)

    ours = MeanTeacher(C, tau=0.95, lambda_u=1.0, weight=weight, rampup=0.4)
    theirs = ref.make("meanteacher", num_classes=C, model=USBNet(net), lambda_u=weight, it=it, num_train_iter=100,
                      unsup_warm_up=0.4, ema=USBEma())
    b = batch(it)
    loss, stats = ours_step(ours, net, b, it, 100, ema=ema)
    _, log = theirs.train_step(b["x_lb"], b["y_lb"], b["weak"], b["strong"])
    assert close(stats["loss_x"], log["train/sup_loss"]) and close(stats["loss_u"], log["train/unsup_loss"])
    linear = usb_ramp(log, weight)
    assert close(linear, min(1.0, it / 40)) and close(stats["consistency_weight"], weight * laine_aila(linear))
    student_only = F.mse_loss((b["strong"].flatten(1) @ net.w).softmax(1),
                              (b["weak"].flatten(1) @ ema.shadow["w"]).softmax(1))
    assert close(stats["loss_u"], student_only) and not close(student_only, F.mse_loss(
        (b["strong"].flatten(1) @ net.w).softmax(1), (b["weak"].flatten(1) @ net.w).softmax(1)))  # the teacher mattered


def test_parity_vat(ref, monkeypatch):
    """USB's random start, drawn from torch's global generator, is the one ours uses (shared, as the module
    says); both sides take xi = 1e-2 (USB's train_step passes no xi, so its vat_loss is given it), since at the
    default 1e-6 a float32 finite difference of these inputs is rounding. USB's .cuda() calls are the
    identity on this CPU."""
    net, weight, it, eps, xi = Net(), 0.3, 60, 6.0, 1e-2
    ours = VAT(C, tau=0.95, lambda_u=1.0, weight=weight, rampup=0.4, eps=eps, xi=xi, entropy_weight=0.06)
    theirs = ref.make("vat", num_classes=C, model=USBNet(net), lambda_u=weight, it=it, num_train_iter=100,
                      unsup_warm_up=0.4, vat_eps=eps, vat_embed=False, lambda_ent=0.06)
    theirs.vat_loss = functools.partial(theirs.vat_loss, xi=xi)
    b = batch(it, views=("weak",))
    torch.manual_seed(11)
    start = torch.Tensor(b["weak"].size()).normal_()
    monkeypatch.setattr("distssl.ssl.vat.random_directions", lambda shape, *a, **k: start.clone())
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)
    loss, stats = ours_step(ours, net, b, it, 100)
    torch.manual_seed(11)
    _, log = theirs.train_step(b["x_lb"], b["y_lb"], b["weak"])
    assert close(stats["loss_x"], log["train/sup_loss"]) and close(stats["loss_u"], log["train/unsup_loss"])
    assert close(stats["loss_entropy"], log["train/loss_entmin"])
    assert close(loss, log["train/total_loss"])  # past the warm-up both ramps are 1
    at_start = b["weak"] + eps * start / start.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    no_attack = F.kl_div((at_start.flatten(1) @ net.w).log_softmax(1), (b["weak"].flatten(1) @ net.w).log_softmax(1),
                         log_target=True, reduction="batchmean")  # KL(p(x) || p(x + eps d0 / |d0|))
    assert float(stats["loss_u"]) > float(no_attack.detach())  # the power iteration found a worse direction


# --- the mixing methods -------------------------------------------------------------------------------

def shared_mixup(monkeypatch, generator: torch.Generator, rows: int, alpha: float):
    """The lambda' and permutation our ``mixup`` will draw from ``generator`` for ``rows`` rows, given to USB's
    ``mixup_one_target`` (np.random.beta and torch.randperm) for its next call; ``generator`` is left as it was."""
    replay = torch.Generator().set_state(generator.get_state())
    _, _, lam, perm = mixup(torch.zeros(rows, 1), torch.zeros(rows, 1), alpha, replay)
    monkeypatch.setattr(np.random, "beta", lambda a, b: lam)  # lam >= 0.5 already: max(lam, 1 - lam) = lam
    real_randperm = torch.randperm
    monkeypatch.setattr(torch, "randperm", lambda n, *a, **k: perm.clone() if n == rows else real_randperm(n, *a, **k))
    return replay


@pytest.mark.parametrize("it", [1, 30])  # USB's 1/64-of-the-run warm-up at 100 steps ends at step 1.6
def test_parity_mixmatch(ref, monkeypatch, it):
    net, weight, alpha = Net(), 75.0, 0.75
    ours = MixMatch(C, tau=0.95, lambda_u=1.0, k=2, temperature=0.5, alpha=alpha, weight=weight, rampup=1 / 64)
    theirs = ref.make("mixmatch", num_classes=C, model=USBNet(net), lambda_u=weight, it=it, num_train_iter=100,
                      T=0.5, unsup_warm_up=1 / 64, mixup_alpha=alpha, mixup_manifold=False)
    b = batch(it, views=("weak", "weak_2"), n_lb=8, n_ulb=8)
    gen = torch.Generator().manual_seed(21)
    with monkeypatch.context() as patched:
        shared_mixup(patched, gen, 8 * 3, alpha)
        _, log = theirs.train_step(b["x_lb"], b["y_lb"], b["weak"], b["weak_2"])
    loss, stats = ours_step(ours, net, b, it, 100, generator=gen)
    assert_losses(loss, stats, log, f"it {it}")


@pytest.mark.parametrize("it", [1, 30])
def test_parity_remixmatch(ref, monkeypatch, it):
    """K = 2 (USB's): the labeled batch, both strong views and the weak one mixed, the first strong view's
    unmixed loss, the rotation loss; DA towards the labeled distribution (USB's 'gt')."""
    net, alpha = Net(), 0.75
    labels = [0, 0, 1, 2, 2, 3, 4, 4, 1, 3]
    hist = torch.bincount(torch.tensor(labels), minlength=C).float()
    da = DistributionAlignment(C, momentum=0.999, p_target=target_from_histogram(hist))
    ours = ReMixMatch(C, tau=0.95, lambda_u=1.0, da=da, k=2, temperature=0.5, alpha=alpha, weight=1.5,
                      pre_mixup_weight=0.5, rotation_weight=0.5, rampup=1 / 64)
    theirs = ref.make("remixmatch", num_classes=C, model=USBNet(net), lambda_u=1.5, it=it, num_train_iter=100,
                      T=0.5, unsup_warm_up=1 / 64, mixup_alpha=alpha, mixup_manifold=False, lambda_kl=0.5,
                      lambda_rot=0.5, use_rot=True, dataset_dict={"train_lb": type("Set", (), {"targets": labels})})
    for step in range(2):
        b = batch(10 * it + step, views=("weak", "strong", "strong_2"), n_lb=6, n_ulb=6)
        gen = torch.Generator().manual_seed(31 + step)
        usb_step = AtStepStart(theirs, ("DistAlignHook", "update_p"))
        with monkeypatch.context() as patched:
            replay = shared_mixup(patched, gen, 6 * 4, alpha)
            quarters = torch.randint(0, 4, (6,), generator=replay)  # the rotations ours draws next
            _, log = usb_step.train_step(b["x_lb"], b["y_lb"], b["weak"], b["strong"], b["strong_2"],
                                         rotate_quarters(b["strong"], quarters), quarters)
        loss, stats = ours_step(ours, net, b, it, 100, generator=gen)
        assert_losses(loss, stats, log, f"it {it}, step {step}")
        usb_step.commit()
        assert close(ours.da.p_model, theirs.hooks_dict["DistAlignHook"].p_model)
