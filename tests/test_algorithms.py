"""Each algorithm's rule on hand-made probabilities, its state the same from one rank or two (a fake
reduce/gather that sums or concatenates what two ranks would send), and its state saved and restored."""
import math

import pytest
import torch
import torch.nn.functional as F

from distssl.ssl.distalign import DistributionAlignment
from distssl.ssl.fixmatch import FixMatch
from distssl.ssl.flexmatch import FlexMatch, flex_thresholds
from distssl.ssl.freematch import FreeMatch, fairness_loss, freematch_mask
from distssl.ssl.softmatch import SoftMatch, soft_weights


def P(*rows):
    return torch.tensor(rows, dtype=torch.float32)


def test_fixmatch_masks_at_the_fixed_threshold_and_matches_the_pure_loss():
    probs = P([0.96, 0.02, 0.02], [0.5, 0.3, 0.2], [0.01, 0.01, 0.98])
    algo = FixMatch(3, tau=0.95, lambda_u=1.0)
    assert algo.weights(probs, None).tolist() == [1.0, 0.0, 1.0]
    g = torch.Generator().manual_seed(0)
    lx, ls = torch.randn(4, 3, generator=g), torch.randn(3, 3, generator=g)
    y = torch.tensor([0, 1, 2, 0])
    loss, stats = algo.rule_loss(lx, y, ls, probs)
    mask = torch.tensor([1.0, 0.0, 1.0])
    by_formula = F.cross_entropy(lx, y) + (F.cross_entropy(ls, probs.argmax(1), reduction="none") * mask).mean()
    assert torch.allclose(loss, by_formula) and stats["mask_rate"] == pytest.approx(2 / 3)


def test_flexmatch_thresholds_follow_each_classes_learning_status():
    status = torch.tensor([0, 0, 0, 0, 1, 1, -1, -1, -1, -1])  # class 0 learned most, class 2 not at all
    t = flex_thresholds(status, 3, 0.95, warmup=True)  # denominator max(4, unused 4) = 4
    beta = torch.tensor([1.0, 0.5, 0.0])
    assert torch.allclose(t, 0.95 * beta / (2 - beta))
    t_nowarm = flex_thresholds(torch.tensor([0, 1, -1, -1, -1, -1, -1]), 3, 0.95, warmup=False)
    assert torch.allclose(t_nowarm, 0.95 * torch.tensor([1.0, 1.0, 0.0]))  # / max sigma = 1
    # warm-up: with most samples unseen every class starts near 0 (the curriculum's easy start)
    beta0 = 1 / 99  # one sample of class 0, 99 unseen
    assert flex_thresholds(torch.tensor([0] + [-1] * 99), 3, 0.95, True)[0] == pytest.approx(0.95 * beta0 / (2 - beta0))


def test_flexmatch_updates_status_only_for_confident_samples_and_masks_per_class():
    algo = FlexMatch(3, tau=0.9, lambda_u=1.0, num_unlabeled=6)
    probs = P([0.95, 0.03, 0.02], [0.2, 0.7, 0.1], [0.05, 0.92, 0.03])
    algo.rule_loss(torch.zeros(1, 3), torch.tensor([0]), torch.zeros(3, 3), probs, ids=torch.tensor([4, 1, 2]))
    algo.end_step()
    assert algo.status.tolist() == [-1, -1, 1, -1, 0, -1]  # sample 1 (0.7) is not confident: no status
    # sigma = [1, 1, 0], unused 4: beta = [0.25, 0.25, 0]; thresholds 0.9 * 0.25 / 1.75
    w = algo.weights(P([0.2, 0.7, 0.1], [0.1, 0.1, 0.8]), None)
    assert w.tolist() == [1.0, 1.0]  # class 2 threshold is 0: anything counts early in the curriculum


def test_freematch_thresholds_are_the_ema_of_confidence_scaled_per_class():
    p_model = torch.tensor([0.5, 0.25, 0.25])
    probs = P([0.6, 0.3, 0.1], [0.2, 0.55, 0.25], [0.1, 0.2, 0.7])
    # thresholds: 0.8 * [1, 0.5, 0.5] = [0.8, 0.4, 0.4]
    assert freematch_mask(probs, 0.8, p_model).tolist() == [0.0, 1.0, 1.0]
    algo = FreeMatch(3, tau=0.95, lambda_u=1.0, momentum=0.5)
    assert algo.time_p == pytest.approx(1 / 3)
    algo.update(probs, None)
    assert algo.time_p == pytest.approx(0.5 / 3 + 0.5 * (0.6 + 0.55 + 0.7) / 3)
    assert torch.allclose(algo.p_model, 0.5 / 3 + 0.5 * probs.mean(dim=0))
    assert torch.allclose(algo.label_hist, 0.5 / 3 + 0.5 * torch.tensor([1 / 3, 1 / 3, 1 / 3]))


def test_freematch_fairness_loss_is_the_papers_eq_11_with_its_sign():
    """L_f = -H(SumNorm(p_t / h_t), SumNorm(p_s / h_s)) over the masked strong views (Wang et al. 2023, Eq. 11;
    the sign the authors confirm in USB issue #182), written out here from the paper."""
    p_model, hist = torch.tensor([0.5, 0.3, 0.2]), torch.tensor([0.2, 0.5, 0.3])
    logits = torch.log(torch.tensor([[8.0, 1, 1], [1, 8, 1], [6, 3, 1], [1, 1, 8]]))
    mask = torch.tensor([1.0, 1.0, 1.0, 0.0])  # the last sample is not masked in
    kept = logits[:3].softmax(dim=1)
    # predicted classes of the kept: 0, 1, 0, so h_s = [2/3, 1/3, 0]: divided by it, the empty class dropped
    mean_s = kept.mean(dim=0) * torch.tensor([1.5, 3.0, 0.0])
    mean_s = mean_s / mean_s.sum()
    target = p_model / hist
    target = target / target.sum()
    cross_entropy = -(target * torch.log(mean_s + 1e-12)).sum()
    assert torch.allclose(fairness_loss(logits, mask, p_model, hist), -cross_entropy)
    assert float(fairness_loss(logits, torch.zeros(4), p_model, hist)) == 0.0  # nothing masked in: no loss


def test_freematch_fairness_target_drops_a_class_the_histogram_never_saw():
    """A class whose EMA histogram is 0 (momentum 0, or underflow) leaves the target, as USB's
    replace_inf_to_zero does; dividing by a clamped 0 put the whole target on it."""
    p_model, hist = torch.tensor([0.5, 0.3, 0.2]), torch.tensor([0.6, 0.4, 0.0])
    logits = torch.log(torch.tensor([[8.0, 1, 1], [1, 8, 1]]))
    probs = logits.softmax(dim=1)
    mean_s = probs.mean(dim=0) * torch.tensor([2.0, 2.0, 0.0])
    mean_s = mean_s / mean_s.sum()
    target = torch.tensor([0.5 / 0.6, 0.3 / 0.4, 0.0])
    target = target / target.sum()
    want = (target * torch.log(mean_s + 1e-12)).sum()
    assert torch.allclose(fairness_loss(logits, torch.ones(2), p_model, hist), want)


def test_softmatch_weights_are_one_above_the_mean_and_gaussian_below():
    w = soft_weights(torch.tensor([0.9, 0.7, 0.5]), mu=0.7, var=0.04, n_sigma=2.0)
    assert w[0] == 1.0 and w[1] == 1.0
    assert float(w[2]) == pytest.approx(math.exp(-(0.2 ** 2) / (2 * 0.04 / 4)))
    algo = SoftMatch(3, tau=0.95, lambda_u=1.0, momentum=0.0)  # momentum 0: the batch's own statistics
    algo.update(P([0.9, 0.05, 0.05], [0.5, 0.3, 0.2], [0.4, 0.3, 0.3]), None)
    assert algo.mu == pytest.approx(0.6) and algo.var == pytest.approx(torch.tensor([0.9, 0.5, 0.4]).var().item())


@pytest.mark.parametrize("make", [
    lambda **kw: FixMatch(4, tau=0.6, lambda_u=1.0, **kw),
    lambda **kw: FlexMatch(4, tau=0.6, lambda_u=1.0, num_unlabeled=16, **kw),
    lambda **kw: FreeMatch(4, tau=0.6, lambda_u=1.0, momentum=0.9, **kw),
    lambda **kw: SoftMatch(4, tau=0.6, lambda_u=1.0, momentum=0.9, **kw),
])
def test_state_from_one_rank_equals_state_from_two_and_survives_a_checkpoint(make):
    g = torch.Generator().manual_seed(3)
    steps = [(torch.softmax(3 * torch.randn(8, 4, generator=g), 1), torch.randperm(16, generator=g)[:8])
             for _ in range(5)]
    one = make(da=DistributionAlignment(4, 0.9, reduce=lambda t: t))

    def run(algo, rank_batches):
        for probs, ids in rank_batches:
            algo.rule_loss(torch.zeros(1, 4), torch.tensor([0]), torch.zeros(len(probs), 4), probs, ids=ids)
            algo.end_step()

    run(one, steps)
    # rank 0 of two: it holds the first half of each global batch; its collectives return what the two
    # halves together give (sums added, gathers concatenated in rank order)
    r0 = make(da=DistributionAlignment(4, 0.9))
    for probs, ids in steps:
        second = probs[4:]
        aligned = r0.da.align_with_current(second) if r0.da is not None else second
        # what rank 1 would contribute to each collective of this step, in the order they are made
        contributions = iter(_contributions(r0, second, aligned, ids[4:]))
        r0.reduce = r0.da.reduce = lambda t: t + next(contributions)
        r0.gather = lambda t: torch.cat([t, next(contributions)])
        r0.rule_loss(torch.zeros(1, 4), torch.tensor([0]), torch.zeros(4, 4), probs[:4], ids=ids[:4])
        r0.end_step()
    a, b = one.state_dict(), r0.state_dict()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert torch.allclose(a[k].float(), b[k].float(), atol=1e-6), k
    restored = make(da=DistributionAlignment(4, 0.9, reduce=lambda t: t))
    restored.load_state_dict(one.state_dict())
    probs = steps[0][0]
    assert torch.equal(restored.weights(restored.da.align_with_current(probs), None),
                       one.weights(one.da.align_with_current(probs), None))


def _contributions(algo, raw, aligned, ids):
    """Rank 1's side of every collective one end_step makes: DA's sum, then the algorithm's."""
    out = [torch.cat([raw.double().sum(dim=0), raw.new_tensor([raw.shape[0]], dtype=torch.float64)])]
    if isinstance(algo, FlexMatch):
        max_p, pseudo = aligned.max(dim=1)
        out.append(torch.stack([ids.long(), pseudo, (max_p >= algo.tau).long()], dim=1))
    elif isinstance(algo, FreeMatch):
        max_p, pseudo = aligned.max(dim=1)
        hist = torch.bincount(pseudo, minlength=algo.num_classes).double()
        out.append(torch.cat([max_p.double().sum().view(1), aligned.double().sum(dim=0), hist,
                              aligned.new_tensor([aligned.shape[0]], dtype=torch.float64)]))
    elif isinstance(algo, SoftMatch):
        max_p = aligned.max(dim=1).values.double()
        out.append(torch.stack([max_p.sum(), (max_p ** 2).sum(), max_p.new_tensor(max_p.numel())]))
    return out


def test_a_sweep_can_search_the_algorithm_like_any_key():
    from distssl.config import ConfigError, load_config
    from distssl.tune import check_space

    base = load_config("configs/demo.yaml", ["data.demo_root=null"])
    from distssl.config import ALGORITHM_NAMES

    check_space({"ssl.algorithm": {"choice": list(ALGORITHM_NAMES)}}, base)  # the whole family
    with pytest.raises(ConfigError, match="space.ssl.algorithm"):
        check_space({"ssl.algorithm": {"choice": ["fixmatch", "simmatch"]}}, base)
    with pytest.raises(ConfigError, match="ssl.freematch.fairness_weight"):
        load_config("configs/demo.yaml", ["ssl.freematch.fairness_weight=-1"])
    with pytest.raises(ConfigError, match="unknown key 'ssl.softmatch.sigma'"):
        load_config("configs/demo.yaml", ["ssl.softmatch.sigma=2"])


def test_adaptive_momenta_keep_the_papers_memory_as_a_share_of_the_run():
    """The papers' 0.999 on their 2^20-step CIFAR runs; the same 0.1%-of-the-run memory on a longer or
    shorter run, never under the steps that see 32 weak views of each class."""
    from distssl.ssl.algorithm import PAPER_RUN, RunShape, run_momentum

    assert run_momentum(PAPER_RUN, 10) == pytest.approx(0.999)
    assert run_momentum(RunShape(2 ** 21, 448), 10) == pytest.approx(1 - 1 / 2000)  # twice as long: twice the memory
    imagenet = RunShape(75_000, 5 * 1024, 1_281_167)  # configs/imagenet.yaml
    assert 1 / (1 - run_momentum(imagenet, 1000)) == pytest.approx(1000 * 75_000 / 2 ** 20)
    demo = RunShape(400, 7 * 16, 5000)
    assert 1 / (1 - run_momentum(demo, 10)) == pytest.approx(32 * 10 / 112)  # the floor: 32 views a class
    # the 0.999 of a 400-step run left 67% of the initial guess in the state; the derived memory leaves none
    assert 0.999 ** 400 > 0.6 and run_momentum(demo, 10) ** 400 < 1e-9


def test_null_keys_are_derived_from_the_run_and_recorded_set_ones_are_kept():
    from distssl.ssl.algorithm import RunShape

    demo = RunShape(400, 112, 5000)  # 9 epochs of the unlabeled set
    free = FreeMatch(10, tau=0.95, lambda_u=1.0, shape=demo)
    assert free.momentum == pytest.approx(1 - 112 / 320) and free.derived == {"ssl.freematch.momentum": free.momentum}
    assert SoftMatch(10, tau=0.95, lambda_u=1.0, shape=demo).momentum == free.momentum
    assert FreeMatch(10, tau=0.95, lambda_u=1.0, shape=demo, momentum=0.999).derived == {}
    flex = FlexMatch(10, tau=0.95, lambda_u=1.0, num_unlabeled=5000, shape=demo)
    assert flex.warmup is False and flex.derived == {"ssl.flexmatch.warmup": False}
    long_run = RunShape(2 ** 20, 448, 50_000)  # the paper's 9,400 epochs
    assert FlexMatch(10, tau=0.95, lambda_u=1.0, num_unlabeled=50_000, shape=long_run).warmup is True
    assert FlexMatch(10, tau=0.95, lambda_u=1.0, num_unlabeled=5000, shape=demo, warmup=True).warmup is True
