"""MixMatch on the seam: K views per sample from one decode, guesses averaged and sharpened, MixUp across
the labeled and unlabeled batch, one gradient forward of the mixed batch; its loss against its formula."""
import json
import random

import pytest
import torch
import torch.nn.functional as F

from distssl.data.samples import unlabeled_item, unlabeled_plan_item
from distssl.data.streams import Raw
from distssl.data.transforms import Views
from distssl.ssl import build
from distssl.ssl.algorithm import Algorithm, Forwarded, view_order, views_of
from distssl.ssl.mixmatch import MixMatch, linear_ramp, mixup, sharpen
from distssl.ssl.remixmatch import ReMixMatch


def test_views_are_drawn_in_one_order_whatever_an_algorithm_asks_for():
    assert sorted(["strong_2", "weak_3", "weak", "weak_2", "strong"], key=view_order) == \
        ["weak", "strong", "weak_2", "strong_2", "weak_3"]
    assert views_of("strong", 3) == ("strong", "strong_2", "strong_3")
    with pytest.raises(ValueError, match="unknown unlabeled view 'medium'"):
        view_order("medium")


def test_k_views_come_from_one_decode_with_the_seeded_choices_of_the_device_path(tiny_data):
    """Eight strong views of one image: each its own draws, the same on the device path's plans (so a
    resume, drawing from the same seed, makes the same eight)."""
    import tarfile
    from pathlib import Path

    views = Views(28, crop="pad")
    shard = sorted(Path(tiny_data["unlabeled"]).glob("*.tar"))[0]
    with tarfile.open(shard) as t:
        png = next(t.extractfile(m).read() for m in t.getmembers() if m.name.endswith(".png"))
    raw = Raw("k", {"png": png, "json": json.dumps({"label": 3}).encode()}, index=0)
    eight = views_of("strong", 8)
    item = unlabeled_item(views, wanted=("weak",) + eight)(raw, random.Random(7))
    again = unlabeled_item(views, wanted=("weak",) + eight)(raw, random.Random(7))
    assert all(torch.equal(item[v], again[v]) for v in eight)
    assert len({item[v].numpy().tobytes() for v in eight}) == 8  # eight different views
    plans = unlabeled_plan_item(views, wanted=("weak",) + eight)(raw, random.Random(7))
    assert sorted(k for k in plans if k.startswith("plan_")) == sorted(f"plan_{v}" for v in ("weak",) + eight)


def test_sharpen_mixup_and_the_ramp_follow_their_formulas():
    p = torch.tensor([[0.6, 0.3, 0.1]])
    q = sharpen(p, 0.5)
    assert torch.allclose(q, p ** 2 / (p ** 2).sum())
    x, y = torch.arange(8.0).view(4, 2), torch.eye(4)
    g = torch.Generator().manual_seed(0)
    mx, my, lam, perm = mixup(x, y, 0.75, g)
    assert lam >= 0.5 and torch.allclose(mx, lam * x + (1 - lam) * x[perm])
    assert torch.allclose(my, lam * y + (1 - lam) * y[perm]) and torch.allclose(my.sum(1), torch.ones(4))
    assert (linear_ramp(0, 1024, 1 / 64), linear_ramp(8, 1024, 1 / 64), linear_ramp(500, 1024, 1 / 64)) == (0, 0.5, 1)
    from distssl.ssl.mixmatch import ramp_fraction

    assert ramp_fraction(2 ** 20) == 1 / 64 and ramp_fraction(400) == 0.4  # the paper's 16,384 steps, capped
    from distssl.ssl.algorithm import RunShape

    assert MixMatch(10, tau=0.95, lambda_u=1.0, shape=RunShape(400, 112)).derived == {"ssl.mixmatch.rampup": 0.4}


def test_the_loss_is_mixed_cross_entropy_plus_ramped_l2_of_the_mixed_guesses():
    torch.manual_seed(0)
    algo = MixMatch(3, tau=0.95, lambda_u=2.0, k=2, temperature=0.5, alpha=0.75, weight=75, rampup=0.5)
    assert algo.needs.views == ("weak", "weak_2") and algo.needs.with_grad == () and type(algo).forward is not \
        Algorithm.forward  # a step of its own: the mixing one
    x_lb, y_lb = torch.randn(2, 4), torch.tensor([0, 2])
    views = {"weak": torch.randn(3, 4), "weak_2": torch.randn(3, 4)}
    logits_u = {"weak": torch.randn(3, 3), "weak_2": torch.randn(3, 3)}
    guess = sharpen((logits_u["weak"].softmax(1) + logits_u["weak_2"].softmax(1)) / 2, 0.5)
    inputs, targets = algo.mix(x_lb, y_lb, views, logits_u, torch.Generator().manual_seed(3))
    assert inputs.shape == (8, 4) and targets.shape == (8, 3)
    # the same draws by hand: concatenated batch, one lambda', one permutation
    _, want, lam, perm = mixup(torch.cat([x_lb, views["weak"], views["weak_2"]]),
                               torch.cat([F.one_hot(y_lb, 3).float(), guess, guess]), 0.75,
                               torch.Generator().manual_seed(3))
    assert torch.allclose(targets, want)
    logits = torch.randn(8, 3)
    fw = Forwarded(logits_x=logits, targets_x=y_lb, logits_u=logits_u, mixed_targets=targets, step=10,
                   total_steps=100, true_u=torch.tensor([0, 1, -1]))
    loss, stats = algo.loss(fw)
    lx = -(targets[:2] * logits[:2].log_softmax(1)).sum(1).mean()
    lu = ((logits[2:].softmax(1) - targets[2:]) ** 2).mean()
    w = 2.0 * 75 * 10 / 50
    assert torch.allclose(loss, lx + w * lu) and stats["consistency_weight"] == pytest.approx(w)
    right = (guess.argmax(1) == torch.tensor([0, 1, -1]))[:2].float().sum() / 2
    assert float(stats["pseudo_acc_all"]) == pytest.approx(float(right))


def test_mixmatch_is_built_from_its_config_section():
    from distssl.config import load_config

    cfg = load_config(None, ["data.labeled=L", "data.unlabeled=U", "data.eval=E", "ssl.algorithm=mixmatch",
                             "ssl.mixmatch.k=3"])
    algo = build(cfg.ssl, 10, None, 100)
    assert isinstance(algo, MixMatch) and algo.needs.views == ("weak", "weak_2", "weak_3")
    from distssl.config import ConfigError

    with pytest.raises(ConfigError, match="ssl.mixmatch.k"):
        load_config(None, ["data.labeled=L", "data.unlabeled=U", "data.eval=E", "ssl.mixmatch.k=0"])


def test_the_guess_forward_leaves_the_running_statistics_to_the_mixed_one():
    """MixMatch's step (forward_mixed): the K views' forward normalises with their own batch statistics and
    leaves BatchNorm's running ones as they were; the mixed batch's forward moves them (one batch of labeled
    and unlabeled rows, as the paper's interleaving intends)."""
    from distssl.ssl.step import StepInputs
    from distssl.train.bnstats import BatchStatsSharing

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 3)).train()
    algo = MixMatch(3, tau=0.95, lambda_u=1.0)
    bn = model[1]
    seen = []
    real = algo.mix

    def mix(*a):
        seen.append(bn.running_mean.clone())  # when mix runs, only the guess forward has happened
        return real(*a)

    algo.mix = mix
    fw = algo.forward(StepInputs(model=model, x_lb=torch.randn(2, 4), y_lb=torch.tensor([0, 1]),
                                 views={"weak": torch.randn(5, 4) + 3, "weak_2": torch.randn(5, 4) + 3},
                                 bn_sharing=BatchStatsSharing(model), generator=torch.Generator().manual_seed(0)))
    assert torch.equal(seen[0], torch.zeros(4))  # the guesses did not move the running mean
    assert not torch.equal(bn.running_mean, torch.zeros(4))  # the mixed forward did
    assert fw.logits_x.shape == (12, 3) and fw.logits_x.requires_grad and not fw.logits_u["weak"].requires_grad


def test_remixmatch_anchors_k_strong_views_to_the_aligned_weak_guess_and_adds_its_two_losses():
    from distssl.ssl.distalign import DistributionAlignment
    from distssl.ssl.remixmatch import ReMixMatch, rotate_quarters

    torch.manual_seed(0)
    da = DistributionAlignment(3, momentum=0.9, reduce=lambda t: t)
    da.p_model = torch.tensor([0.5, 0.3, 0.2])
    algo = ReMixMatch(3, tau=0.95, lambda_u=1.0, da=da, k=2, rampup=0.5)
    assert algo.needs.views == ("weak", "strong", "strong_2") and algo.heads == {"rotation": 4}
    assert algo.needs.no_grad == ("weak",)
    x_lb, y_lb = torch.randn(2, 3, 4, 4), torch.tensor([0, 2])
    views = {v: torch.randn(3, 3, 4, 4) for v in algo.needs.views}
    logits_u = {"weak": torch.randn(3, 3)}
    aligned = logits_u["weak"].softmax(1) * (torch.ones(3) / 3) / da.p_model
    guess = sharpen(aligned / aligned.sum(1, keepdim=True), 0.5)
    inputs, targets = algo.mix(x_lb, y_lb, views, logits_u, torch.Generator().manual_seed(1))
    # labeled + K strong + the weak view mixed (the reference mixes the weak view too), + the unmixed strong view
    assert inputs.shape[0] == 2 + 3 * 3 + 3 and torch.equal(inputs[-3:], views["strong"])
    assert torch.allclose(targets[-3:], guess)
    x_rot, quarters = algo.rotate(views, torch.Generator().manual_seed(2))
    assert torch.equal(x_rot, rotate_quarters(views["strong"], quarters)) and set(quarters.tolist()) <= {0, 1, 2, 3}
    assert torch.allclose(targets[2:11].sum(1), torch.ones(9))  # mixed rows of guesses and one-hots
    logits, rot = torch.randn(14, 3), torch.randn(3, 4)
    fw = Forwarded(logits_x=logits, targets_x=y_lb, logits_u=logits_u, mixed_targets=targets, step=5,
                   total_steps=20, head_logits={"rotation": rot}, head_targets={"rotation": quarters})
    loss, stats = algo.loss(fw)
    ce = lambda lg, t: -(t * lg.log_softmax(1)).sum(1).mean()  # noqa: E731
    want = ce(logits[:2], targets[:2]) + 1.5 * 0.5 * ce(logits[2:11], targets[2:11]) + \
        0.5 * 0.5 * ce(logits[11:], guess) + 0.5 * F.cross_entropy(rot, quarters)
    assert torch.allclose(loss, want, atol=1e-6)
    algo.end_step()  # p_model moved by the raw (unaligned) weak probabilities
    assert torch.allclose(da.p_model, 0.9 * torch.tensor([0.5, 0.3, 0.2]) + 0.1 * logits_u["weak"].softmax(1).mean(0))


def test_the_rotation_head_trains_through_the_models_forward_and_stays_out_of_exports():
    import timm

    from distssl.models.heads import add_heads, without_aux_heads

    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    before = model(x)
    add_heads(model, ReMixMatch.heads)
    assert torch.equal(model(x), before) and model(x, head="rotation").shape == (2, 4)
    keys = set(model.state_dict())
    assert {"rotation_head.weight", "rotation_head.bias"} <= keys
    assert set(without_aux_heads(model.state_dict(), ReMixMatch.heads)) == keys - {"rotation_head.weight",
                                                                                   "rotation_head.bias"}


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("algorithm", ["mixmatch", "remixmatch"])
def test_a_two_rank_run_trains_saves_and_resumes_exactly_once(tiny_data, tmp_path, algorithm):
    """2 ranks under ZeRO-2: every step logged once across a resume; ReMixMatch's DA state (the same on
    both ranks) saved and restored; the export is the plain timm model."""
    from safetensors.torch import load_file

    from conftest import run_train, tiny_overrides
    from distssl.checkpoint import layout as ckpt

    out = tmp_path / "run"
    args = tiny_overrides(tiny_data, out, **{"train.steps": 4, "train.ckpt_every": 2, "train.eval_every": 4,
                                             "ssl.algorithm": algorithm, "ssl.remixmatch.k": 2})
    r = run_train(args, nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    _, tag, _ = ckpt.latest(out / "checkpoints")
    states = [ckpt.load_rank_state(ckpt.rank_state_path(out / "checkpoints", tag, rank))["algorithm"]
              for rank in (0, 1)]
    assert states[0]["algorithm"] == algorithm
    if algorithm == "remixmatch":
        assert torch.equal(states[0]["da"]["p_model"], states[1]["da"]["p_model"])
    r = run_train(args + ["train.steps=6"], nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    steps = [d["step"] for d in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in d]
    assert sorted(steps) == list(range(1, 7))
    assert not any(k.startswith("rotation_head") for k in load_file(str(out / "model.safetensors")))
