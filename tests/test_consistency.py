"""The consistency family and UDA on the seam: each loss on hand-made tensors against its paper's
formula, the forward that the seam asks of the engine (which views, with or without gradient, the EMA
teacher), and the per-sample ensemble's state across ranks and checkpoints."""
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from distssl import ssl as algorithms
from distssl.config import ALGORITHM_NAMES, SSLConfig, load_config
from distssl.ssl.algorithm import Forwarded, ramp_up
from distssl.ssl.fixmatch import FixMatch
from distssl.ssl.meanteacher import MeanTeacher
from distssl.ssl.pimodel import PiModel
from distssl.ssl.step import StepInputs
from distssl.ssl.temporal_ensembling import TemporalEnsembling, dense_ensemble
from distssl.ssl.uda import UDA, sharpen, tsa_threshold
from distssl.ssl.vat import VAT, adversarial_direction, kl_with_logits, random_directions
from distssl.train.bnstats import BatchStatsSharing
from distssl.train.ema import EMA

C = 4


def _fw(g, n_lb=3, n_u=5, views=("weak",), **kw):
    logits_x = torch.randn(n_lb, C, generator=g, requires_grad=True)
    logits_u = {v: torch.randn(n_u, C, generator=g, requires_grad=True) for v in views}
    return Forwarded(logits_x=logits_x, targets_x=torch.randint(0, C, (n_lb,), generator=g), logits_u=logits_u,
                     ids=torch.arange(n_u), **kw)


def test_ramp_up_is_laine_and_ailas_gaussian_over_a_fraction_of_the_run():
    assert ramp_up(0, 100, 0.4) == pytest.approx(math.exp(-5))
    assert ramp_up(20, 100, 0.4) == pytest.approx(math.exp(-5 * 0.5 ** 2))
    assert ramp_up(40, 100, 0.4) == ramp_up(99, 100, 0.4) == 1.0
    assert ramp_up(0, 100, 0.0) == 1.0


def test_pimodel_is_ce_plus_ramped_mse_between_two_views_both_with_gradient():
    g = torch.Generator().manual_seed(0)
    fw = _fw(g, views=("weak", "weak_2"), step=10, total_steps=100)
    algo = PiModel(C, tau=0.95, lambda_u=2.0, weight=10.0, rampup=0.4)
    loss, stats = algo.loss(fw)
    a, b = fw.logits_u["weak"].softmax(1), fw.logits_u["weak_2"].softmax(1)
    w = 2.0 * 10.0 * math.exp(-5 * (1 - 10 / 40) ** 2)
    expected = F.cross_entropy(fw.logits_x, fw.targets_x) + w * ((a - b) ** 2).mean()
    assert float(loss) == pytest.approx(float(expected), rel=1e-6)
    assert stats["consistency_weight"] == pytest.approx(w)
    loss.backward()
    assert fw.logits_u["weak"].grad.abs().sum() > 0 and fw.logits_u["weak_2"].grad.abs().sum() > 0


def test_mean_teacher_trains_the_student_towards_the_teachers_softmax():
    g = torch.Generator().manual_seed(1)
    fw = _fw(g, views=("weak_2",), step=50, total_steps=100)
    fw.teacher_u = {"weak": torch.randn(5, C, generator=g)}
    loss, _ = MeanTeacher(C, tau=0.95, lambda_u=1.0, weight=50.0, rampup=0.4, augment="weak").loss(fw)
    expected = (F.cross_entropy(fw.logits_x, fw.targets_x)
                + 50.0 * ((fw.logits_u["weak_2"].softmax(1) - fw.teacher_u["weak"].softmax(1)) ** 2).mean())
    assert float(loss) == pytest.approx(float(expected), rel=1e-6)


def test_uda_sharpens_masks_and_anneals_the_labeled_signal():
    probs = torch.tensor([[0.5, 0.3, 0.1, 0.1]])
    sharp = sharpen(probs, 0.5)
    assert torch.allclose(sharp, probs ** 2 / (probs ** 2).sum())
    assert tsa_threshold("linear", 0.0, C) == pytest.approx(1 / C)
    assert tsa_threshold("linear", 1.0, C) == pytest.approx(1.0)
    assert tsa_threshold("log", 0.5, C) == pytest.approx((1 - math.exp(-2.5)) * 0.75 + 0.25)
    assert tsa_threshold("exp", 0.5, C) == pytest.approx(math.exp(-2.5) * 0.75 + 0.25)
    assert tsa_threshold("none", 0.0, C) == 1.0

    g = torch.Generator().manual_seed(2)
    fw = _fw(g, views=("weak", "strong"), step=0, total_steps=100)
    fw.logits_u["weak"] = torch.tensor([[4.0, 0, 0, 0], [0.1, 0, 0, 0], [0, 0, 5.0, 0], [0, 0, 0, 0], [0, 3.0, 0, 0]])
    algo = UDA(C, tau=0.95, lambda_u=1.0, temperature=0.4, threshold=0.8, tsa="linear")
    loss, stats = algo.loss(fw)
    p = fw.logits_u["weak"].softmax(1)
    mask = (p.max(1).values >= 0.8).float()
    target = sharpen(p, 0.4)
    loss_u = (-(target * F.log_softmax(fw.logits_u["strong"], 1)).sum(1) * mask).mean()
    # at step 0 TSA's threshold is 1/C: a labeled sample whose true class has more is left out
    p_true = fw.logits_x.softmax(1).gather(1, fw.targets_x[:, None]).squeeze(1)
    keep = (p_true <= 0.25).float()
    ce = F.cross_entropy(fw.logits_x, fw.targets_x, reduction="none")
    loss_x = (ce * keep).sum() / keep.sum().clamp_min(1)
    assert float(loss) == pytest.approx(float(loss_x + loss_u), rel=1e-6)
    assert stats["mask_rate"] == pytest.approx(float(mask.mean()))


def test_vat_direction_is_the_one_that_changes_the_prediction_most():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, C))
    x = torch.randn(6, 3, 2, 2)
    logits = model(x)
    d0 = random_directions(x.shape, torch.arange(6), seed=0, step=3)
    d = adversarial_direction(model, x, logits, d0, xi=1e-6, iterations=2)
    assert torch.allclose(d.flatten(1).norm(dim=1), torch.ones(6), atol=1e-5)
    eps = 0.5
    kl_adv = [kl_with_logits(logits[i:i + 1].detach(), model(x[i:i + 1] + eps * d[i:i + 1])) for i in range(6)]
    rand = d0 / d0.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    kl_rand = [kl_with_logits(logits[i:i + 1].detach(), model(x[i:i + 1] + eps * rand[i:i + 1])) for i in range(6)]
    assert all(a > r for a, r in zip(kl_adv, kl_rand))
    assert model[1].weight.grad is None  # the power iteration touched only the input's gradient


def test_vat_random_start_depends_on_the_sample_not_on_its_batch():
    whole = random_directions(torch.Size([4, 3, 2, 2]), torch.tensor([7, 8, 9, 10]), seed=1, step=5)
    half = random_directions(torch.Size([2, 3, 2, 2]), torch.tensor([9, 10]), seed=1, step=5)
    assert torch.equal(whole[2:], half)
    assert not torch.equal(whole, random_directions(torch.Size([4, 3, 2, 2]), torch.tensor([7, 8, 9, 10]), 1, 6))


def test_vat_loss_is_ce_plus_ramped_kl_plus_entropy():
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, C))
    x, xl = torch.randn(5, 3, 2, 2), torch.randn(3, 3, 2, 2)
    fw = Forwarded(logits_x=model(xl), targets_x=torch.tensor([0, 1, 2]), logits_u={"weak": model(x)},
                   inputs_u={"weak": x}, perturbed=model, ids=torch.arange(5), step=100, total_steps=100)
    algo = VAT(C, tau=0.95, lambda_u=1.0, eps=1.0, weight=0.3, entropy_weight=0.06)
    loss, stats = algo.loss(fw)
    d = adversarial_direction(model, x, fw.logits_u["weak"], random_directions(x.shape, torch.arange(5), 0, 100),
                              1e-6, 1)
    kl = kl_with_logits(fw.logits_u["weak"].detach(), model(x + d))
    p = fw.logits_u["weak"].softmax(1)
    ent = -(p * p.log()).sum(1).mean()
    expected = F.cross_entropy(fw.logits_x, fw.targets_x) + 0.3 * kl + 0.06 * ent
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    assert stats["loss_entropy"] == pytest.approx(float(ent), rel=1e-5)


def _te(num_unlabeled=16, top_k=0, classes=C, **kw):
    return TemporalEnsembling(classes, tau=0.95, lambda_u=1.0, num_unlabeled=num_unlabeled, momentum=0.6,
                              top_k=top_k, **kw)


def _te_step(algo, probs, ids, trained=None):
    """One step: ``probs`` the predictions the ensemble is made of, ``trained`` (default: the same) those
    of the view trained towards it."""
    logits = {algo.source: probs.log(), algo.view: (probs if trained is None else trained).log().requires_grad_(True)}
    loss, stats = algo.loss(Forwarded(logits_x=torch.zeros(1, probs.shape[1]), targets_x=torch.tensor([0]),
                                      logits_u=logits, ids=ids, step=1000, total_steps=1000))
    algo.end_step()
    return loss, stats


@pytest.mark.parametrize("ensemble", ["weak", "trained"])
def test_temporal_ensembling_targets_are_the_bias_corrected_ensemble(ensemble):
    """The strong view is trained towards the ensemble of the weak view's predictions (the default) or
    of its own (the paper's single forward)."""
    g = torch.Generator().manual_seed(4)
    algo = _te(ensemble=ensemble)
    assert algo.needs.with_grad == ("strong",) and algo.needs.no_grad == (("weak",) if ensemble == "weak" else ())
    ids = torch.tensor([3, 5])
    weak = [torch.softmax(2 * torch.randn(2, C, generator=g), 1) for _ in range(3)]
    strong = [torch.softmax(2 * torch.randn(2, C, generator=g), 1) for _ in range(3)]
    _, stats = _te_step(algo, weak[0] if ensemble == "weak" else strong[0], ids, trained=strong[0])
    assert stats["target_rate"] == 0.0  # nothing predicted yet: no target, no loss
    _te_step(algo, weak[1] if ensemble == "weak" else strong[1], ids, trained=strong[1])
    z = torch.zeros(2, C)
    for p in (weak if ensemble == "weak" else strong)[:2]:
        z = 0.6 * z + 0.4 * p
    target = z / (1 - 0.6 ** 2)
    loss, stats = _te_step(algo, weak[2] if ensemble == "weak" else strong[2], ids, trained=strong[2])
    expected = math.log(C) + 30.0 * ((strong[2] - target) ** 2).mean()  # CE of the zero labeled logits
    assert float(loss) == pytest.approx(float(expected), rel=1e-3)  # the ensemble is kept in fp16
    assert algo.count[3] == 3 and algo.count[0] == 0


def test_a_compact_ensemble_keeps_its_mass_and_its_top_classes():
    """8 of 50 classes kept, predictions as peaked as a trained model's: the same top class as the exact
    ensemble, the same total mass, and entries within a few hundredths."""
    g = torch.Generator().manual_seed(5)
    exact, compact = _te(top_k=0, classes=50), _te(top_k=8, classes=50)
    ids = torch.arange(8)
    centre = torch.randn(8, 50, generator=g)
    for _ in range(6):
        p = torch.softmax(4 * (centre + 0.3 * torch.randn(8, 50, generator=g)), 1)
        _te_step(exact, p, ids)
        _te_step(compact, p, ids)
    z_exact = dense_ensemble(exact.values, exact.classes, exact.count, 0.6, 50)[:8]
    z_compact = dense_ensemble(compact.values, compact.classes, compact.count, 0.6, 50)[:8]
    assert torch.allclose(z_compact.sum(1), torch.full((8,), 1 - 0.6 ** 6), atol=2e-3)
    assert torch.equal(z_compact.argmax(1), z_exact.argmax(1))
    assert (z_compact - z_exact).abs().max() < 0.03
    assert compact.values.shape == (16, 8) and compact.values.dtype == torch.float16


def test_the_ensemble_from_one_rank_equals_the_ensemble_from_two_and_survives_a_checkpoint():
    g = torch.Generator().manual_seed(6)
    steps = [(torch.softmax(2 * torch.randn(8, C, generator=g), 1), torch.randperm(16, generator=g)[:8])
             for _ in range(4)]
    one = _te(top_k=2)
    for p, ids in steps:
        _te_step(one, p, ids)
    # rank 0 of two: it holds the first half of each global batch; its gather returns both halves
    r0, r1 = _te(top_k=2), _te(top_k=2)
    for p, ids in steps:
        for rank, algo in ((1, r1), (0, r0)):
            mine = slice(rank * 4, rank * 4 + 4)
            logits = p[mine].log().requires_grad_(True)
            algo.loss(Forwarded(logits_x=torch.zeros(1, C), targets_x=torch.tensor([0]),
                                logits_u={algo.source: logits, algo.view: logits},
                                ids=ids[mine], step=1000, total_steps=1000))
        sent = []  # what rank 1 puts into the gather: computed from its own copy of the state
        r1.gather = lambda t: sent.append(t) or t
        r1.end_step()
        r0.gather = lambda t: torch.cat([t, sent[-1]])
        r0.end_step()
        r1.load_state_dict(r0.state_dict())  # rank 1 received the same gathered rows
    for key in ("values", "classes", "count"):
        assert torch.equal(one.state_dict()[key], r0.state_dict()[key]), key
    restored = _te(top_k=2)
    restored.load_state_dict(one.state_dict())
    assert torch.equal(restored.count, one.count) and torch.equal(restored.values, one.values)
    with pytest.raises(ValueError, match="top_k"):
        _te(top_k=3).load_state_dict(one.state_dict())


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.fc = torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4), torch.nn.Linear(4, C)

    def forward(self, x):
        return self.fc(self.bn(self.conv(x)).mean(dim=(2, 3)))


def _inputs(g, b=3, u=5):
    return torch.randn(b, 3, 4, 4, generator=g), {v: torch.randn(u, 3, 4, 4, generator=g)
                                                  for v in ("weak", "strong", "weak_2")}


@pytest.mark.parametrize("weak_forward", ["shared_bn", "concat"])
def test_the_threshold_rules_are_forwarded_as_before_the_seam(weak_forward):
    """The step the engine ran inline before the seam was generalised, against forward_views."""
    g = torch.Generator().manual_seed(7)
    x_lb, views = _inputs(g)
    torch.manual_seed(0)
    old_model, new_model = _Tiny(), _Tiny()
    new_model.load_state_dict(old_model.state_dict())
    old_bn, new_bn = BatchStatsSharing(old_model), BatchStatsSharing(new_model)
    b = x_lb.shape[0]
    if weak_forward == "concat":
        logits = old_model(torch.cat([x_lb, views["weak"], views["strong"]]))
        probs_w = torch.softmax(logits[b:b + 5].detach(), 1)
        logits_s = logits[b + 5:]
    else:
        with old_bn.record():
            logits = old_model(torch.cat([x_lb, views["strong"]]))
        with torch.no_grad(), old_bn.replay():
            probs_w = torch.softmax(old_model(views["weak"]), 1)
        logits_s = logits[b:]
    fw = FixMatch(C, tau=0.95, lambda_u=1.0).forward(StepInputs(
        model=new_model, x_lb=x_lb, y_lb=torch.zeros(b, dtype=torch.long), views=views, bn_sharing=new_bn,
        weak_forward=weak_forward))
    assert torch.equal(fw.logits_x, logits[:b]) and torch.equal(fw.logits_u["strong"], logits_s)
    assert torch.equal(torch.softmax(fw.logits_u["weak"], 1), probs_w)
    assert not fw.logits_u["weak"].requires_grad and fw.logits_u["strong"].requires_grad
    assert torch.equal(new_model.bn.running_mean, old_model.bn.running_mean)


def test_the_teacher_forwards_its_view_with_the_ema_weights_and_the_student_only_its_own():
    g = torch.Generator().manual_seed(8)
    x_lb, views = _inputs(g)
    torch.manual_seed(1)
    model = _Tiny()
    ema = EMA(model, 0.5, warmup=False)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # the live weights move away from the EMA's
    teacher_model = _Tiny()
    teacher_model.load_state_dict({**{n: t for n, t in ema.shadow.items()}, **ema.buffers})
    seen = []
    model.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[0]))
    algo = MeanTeacher(C, tau=0.95, lambda_u=1.0, augment="weak")
    fw = algo.forward(StepInputs(model=model, x_lb=x_lb, y_lb=torch.zeros(3, dtype=torch.long), views=views,
                                 bn_sharing=BatchStatsSharing(model), ema=ema))
    assert torch.allclose(fw.teacher_u["weak"], teacher_model(views["weak"]), atol=1e-6)
    assert seen == [5, 3 + 5]  # the teacher's view, then labeled + the student's view: nothing else
    assert set(fw.logits_u) == {"weak_2"} and fw.logits_u["weak_2"].requires_grad
    assert not fw.teacher_u["weak"].requires_grad
    assert torch.allclose(next(model.parameters()), teacher_model.conv.weight + 1.0)  # swapped back


def test_input_noise_is_each_samples_own_draw_on_the_views_with_gradient():
    """Pi-Model's Gaussian input noise: per sample from (seed, step, id, view), so a sample gets the same
    noise whichever rank or micro-batch holds it, and the two views get different noise."""
    g = torch.Generator().manual_seed(12)
    x_lb, views = _inputs(g, b=2, u=4)
    algo = PiModel(C, tau=0.95, lambda_u=1.0, noise=0.5)
    got = {}

    def record(x):  # the views as the forward sees them: [labeled, weak, weak_2]
        got.setdefault("x", []).append(x.detach().clone())
        return x.flatten(1)[:, :C]

    ids, bn = torch.tensor([11, 12, 13, 14]), BatchStatsSharing(torch.nn.Identity())
    y = torch.zeros(2, dtype=torch.long)
    algo.forward(StepInputs(model=record, x_lb=x_lb, y_lb=y, views=views, bn_sharing=bn, ids=ids, seed=3, step=7))
    whole = got.pop("x")[0]
    noise_weak, noise_weak2 = whole[2:6] - views["weak"], whole[6:10] - views["weak_2"]
    assert torch.equal(whole[:2], x_lb)  # the labeled batch is never noised
    assert 0.3 < float(noise_weak.std()) < 0.7 and not torch.allclose(noise_weak, noise_weak2)
    half = {v: t[2:] for v, t in views.items()}  # the last two samples alone, as another rank would hold them
    algo.forward(StepInputs(model=record, x_lb=x_lb, y_lb=y, views=half, bn_sharing=bn, ids=ids[2:], seed=3, step=7))
    part = got.pop("x")[0]
    assert torch.allclose(part[2:4] - half["weak"], noise_weak[2:], atol=1e-6)
    assert torch.allclose(part[4:6] - half["weak_2"], noise_weak2[2:], atol=1e-6)


def test_every_algorithm_is_registered_with_its_config_section_and_cited_keys():
    from distssl.config.coerce import describe_keys

    assert set(ALGORITHM_NAMES) == set(algorithms.ALGORITHMS)
    rows = {key: meaning for key, kind, _, meaning in describe_keys(SSLConfig, "ssl") if kind != "section"}
    for name in ("uda", "pimodel", "temporal_ensembling", "meanteacher", "vat"):
        own = [k for k in rows if k.startswith(f"ssl.{name}.")]
        assert own and all(rows[k] for k in own), name  # every key says what it is
    cfg = load_config("configs/demo.yaml", ["data.demo_root=null", "ssl.algorithm=vat", "ssl.vat.eps=2.5"])
    built = algorithms.build(cfg.ssl, 10, None, 100)
    assert isinstance(built, VAT) and built.eps == 2.5 and built.da is None  # DA aligns pseudo-labels only
    uda = algorithms.build(dataclasses.replace(cfg.ssl, algorithm="uda"), 10, object(), 100)
    assert uda.da is not None
    with pytest.raises(Exception, match="ssl.temporal_ensembling.momentum"):
        load_config("configs/demo.yaml", ["ssl.temporal_ensembling.momentum=1.5"])
    with pytest.raises(ValueError, match="index.json counts"):
        algorithms.build(dataclasses.replace(cfg.ssl, algorithm="temporal_ensembling"), 10, None, None)


def test_the_ensemble_fits_imagenet_on_every_rank_within_a_fraction_of_a_gigabyte():
    """1,281,167 images x 1,000 classes, the default top_k: the state each rank holds, allocated for
    real, and one step of 64 samples through it."""
    algo = TemporalEnsembling(1000, tau=0.95, lambda_u=1.0, num_unlabeled=1_281_167)
    held = sum(t.numel() * t.element_size() for t in (algo.values, algo.classes, algo.count))
    assert held == 1_281_167 * (32 * 2 + 32 * 2 + 4)  # 169 MB; the full fp32 matrix would be 5.1 GB
    assert held < 0.2 * 2 ** 30
    g = torch.Generator().manual_seed(9)
    probs = torch.softmax(5 * torch.randn(64, 1000, generator=g), 1)
    ids = torch.randint(0, 1_281_167, (64,), generator=g)
    _te_step(algo, probs, ids)
    _, stats = _te_step(algo, probs, ids)
    assert stats["target_rate"] == 1.0 and int(algo.count.sum()) == 2 * ids.unique().numel()


def test_a_frozen_forward_normalises_with_its_own_batch_and_leaves_the_running_statistics():
    torch.manual_seed(2)
    model = _Tiny()
    x = torch.randn(6, 3, 4, 4)
    before = (model.bn.running_mean.clone(), model.bn.running_var.clone(), int(model.bn.num_batches_tracked))
    reference = _Tiny()
    reference.load_state_dict(model.state_dict())
    with BatchStatsSharing(model).frozen():
        out = model(x)
    assert torch.allclose(out, reference(x), atol=1e-6)  # a train-mode forward: the batch's own statistics
    assert torch.equal(model.bn.running_mean, before[0]) and torch.equal(model.bn.running_var, before[1])
    assert int(model.bn.num_batches_tracked) == before[2] and model.bn.momentum == 0.1
