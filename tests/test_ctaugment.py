"""data.strong_aug=ctaugment: the policy's maths on hand-made numbers, its views in the loader and on the
device, the shared-memory board the loader reads it from, and runs that save, resume and agree across ranks."""
import io
import json
import random
import threading
import time
from collections import defaultdict

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_train, tiny_overrides
from distssl.data import ctaugment as cta
from distssl.data import device_augment as dev
from distssl.data.transforms import POOL, Views, to_uint8


def test_a_bin_under_the_threshold_is_never_drawn_and_the_best_always_can_be():
    rates = cta.initial_rates()
    rates[cta.ROTATE, :] = 0.0
    rates[cta.ROTATE, 3] = 1.0  # one good bin: the rest fall under 0.85 of it
    rng = random.Random(0)
    levels = [lv for _ in range(3000) for op, lv in cta.draw(rates, rng, 2, 0.85, 0.99) if op == cta.ROTATE]
    assert len(levels) > 200 and all(cta.bin_of(cta.ROTATE, lv) == 3 for lv in levels)
    assert {int(lv * 17) for lv in levels} == {3}  # and the level is inside that bin
    # fresh weights: every bin of every op is drawn
    seen = defaultdict(set)
    for op, lv in (c for _ in range(6000) for c in cta.draw(cta.initial_rates(), rng, 2, 0.85, 0.99)):
        seen[op].add(cta.bin_of(op, lv))
    assert {op: len(b) for op, b in seen.items()} == dict(enumerate(cta.BINS))


def test_one_steps_update_is_the_references_sequential_ema_with_the_mean_in_place_of_the_order():
    decay = 0.99
    choices = torch.tensor([[[cta.ROTATE, 0.05], [cta.SOLARIZE, 0.5]],
                            [[cta.ROTATE, 0.02], [cta.BRIGHTNESS, 0.99]],
                            [[cta.ROTATE, 0.01], [cta.SOLARIZE, 0.51]]], dtype=torch.float64)
    prox = torch.tensor([0.2, 0.7, 0.9])
    sums = cta.probe_sums(choices, prox).numpy()
    assert sums[0, cta.ROTATE, 0] == 3 and sums[0, cta.SOLARIZE, 8] == 2 and sums[0, cta.BRIGHTNESS, 16] == 1
    assert sums[0].sum() == 6
    new = cta.update(cta.initial_rates(), sums, decay)
    mean = (0.2 + 0.7 + 0.9) / 3
    assert new[cta.ROTATE, 0] == pytest.approx(decay ** 3 + (1 - decay ** 3) * mean, abs=1e-9)
    # one probe in a bin is the reference's update exactly
    assert new[cta.BRIGHTNESS, 16] == pytest.approx(decay + (1 - decay) * 0.7, abs=1e-9)
    untouched = np.ones_like(new, dtype=bool)
    untouched[cta.ROTATE, 0] = untouched[cta.SOLARIZE, 8] = untouched[cta.BRIGHTNESS, 16] = False
    assert np.array_equal(new[untouched], cta.initial_rates()[untouched])
    # equal proximities: the same as n sequential updates whatever their order
    seq = 1.0
    for _ in range(3):
        seq = seq * decay + 0.4 * (1 - decay)
    same = cta.update(cta.initial_rates(), cta.probe_sums(choices, torch.full((3,), 0.4)).numpy(), decay)
    assert same[cta.ROTATE, 0] == pytest.approx(seq, abs=1e-9)


def test_sums_split_over_ranks_add_up_exactly_to_the_whole_batchs():
    g = torch.Generator().manual_seed(0)
    n = 64
    choices = torch.stack([torch.randint(0, 14, (n, 2), generator=g).double(), torch.rand(n, 2, generator=g,
                                                                                         dtype=torch.float64)], -1)
    prox = torch.rand(n, generator=g)
    whole = cta.probe_sums(choices, prox)
    for ranks in (2, 4, 8):
        parts = sum(cta.probe_sums(c, p) for c, p in zip(choices.chunk(ranks), prox.chunk(ranks)))
        assert torch.equal(parts, whole)  # integers: the world size cannot change the policy


def test_proximity_is_one_when_sure_and_right_and_zero_when_sure_and_wrong():
    probs = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.5, 0.25, 0.25]])
    assert torch.allclose(cta.proximity(probs, torch.tensor([0, 0, 0])), torch.tensor([1.0, 0.0, 0.5]))


@pytest.fixture(scope="module")
def photo():
    from sklearn.datasets import load_sample_images

    buf = io.BytesIO()
    Image.fromarray(load_sample_images().images[1][:300, :300]).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def test_the_device_path_makes_the_loader_paths_views_from_the_same_draws(photo):
    views = Views(48, flip=True, pad_fraction=0.125, randaugment_ops=2, cutout_fraction=0.5, interpolation="bicubic")
    rates = cta.initial_rates()
    rates[:, ::2] = 0.3  # a learned-looking policy: half the bins out
    loader_views, device_views = (cta.CTAViews(views, 2, 0.85, 0.99) for _ in range(2))
    loader_views.rates = device_views.rates = rates
    pad = dev.pad_pixels(views)
    worst, ops_seen = 0.0, set()
    for seed in range(200):
        host_rng, dev_rng = random.Random(seed), random.Random(seed)
        base = views.base(photo, host_rng)
        views.base(photo, dev_rng)
        strong_h = loader_views.strong(base, host_rng)
        plan = device_views.strong_plan(dev_rng)
        assert host_rng.random() == dev_rng.random()  # the same draws in the same order
        strong_d = dev.apply_strong(to_uint8(base)[None], torch.tensor([plan]), pad, 2, 0.5)[0]
        ops_seen |= {int(plan[3]), int(plan[7])}
        worst = max(worst, float((strong_d.float() - strong_h.float()).abs().mean()))
    assert ops_seen == set(range(len(POOL)))
    assert worst < 1.0  # PIL's rounding, as RandAugment's device path (tests/test_device_augment.py)


def test_a_probe_is_the_weak_view_under_its_recorded_choices(photo):
    views = Views(48, flip=False, pad_fraction=0.0, randaugment_ops=2, cutout_fraction=0.5)
    c = cta.CTAViews(views, 2, 0.85, 0.99)
    weak = views.weak(views.base(photo, random.Random(1)), random.Random(1))
    probe, choices = c.probe(weak, random.Random(5))
    assert choices.shape == (2, 2) and choices.dtype == torch.float64
    again = Image.fromarray(weak.permute(1, 2, 0).numpy())
    for op, level in choices.tolist():
        again = cta.apply_op(again, int(op), *cta.op_value(int(op), level))
    assert torch.equal(probe, to_uint8(again))


def test_the_board_hands_a_worker_the_policy_of_its_step_and_names_a_stalled_trainer():
    board = cta.PolicyBoard(slots=4, wait_s=0.3)
    rates = cta.initial_rates()
    board.publish(0, rates)
    assert np.array_equal(board.rates_for(0), rates)
    got = {}
    reader = threading.Thread(target=lambda: got.update(r=board.rates_for(1)))
    reader.start()
    time.sleep(0.05)
    assert "r" not in got  # step 1's policy is not out yet: the worker waits
    board.publish(1, rates * 0.5)
    reader.join(5)
    assert np.array_equal(got["r"], rates * 0.5)
    with pytest.raises(RuntimeError, match="waited 0 s for CTAugment's policy of step 7"):
        board.rates_for(7)
    for step in range(2, 6):
        board.publish(step, rates)
    with pytest.raises(RuntimeError, match="overwritten"):
        board.rates_for(1)


def test_every_loader_worker_knows_the_step_of_the_batch_it_fills(tiny_data):
    """The loader hands over its workers' batches in turn: batch i is step first_step + i."""
    from distssl.data.index import resolve
    from distssl.data.streams import TrainStream, loader

    class Recording:
        def __init__(self):
            self.step = -1

        def at_step(self, step):
            self.step = step

        def __call__(self, raw, rng):
            return {"step": self.step}

    for workers in (0, 1, 3):
        recording = Recording()
        stream = TrainStream(resolve(tiny_data["unlabeled"]), rank=0, world_size=1, batch_size=5, seed=0,
                             shuffle_buffer=10, make_item=recording, first_step=7, on_step=recording.at_step)
        steps = []
        for batch in loader(stream, workers, prefetch_factor=2):
            assert len(set(batch["step"].tolist())) == 1
            steps.append(int(batch["step"][0]))
            if len(steps) == 9:
                break
        assert steps == list(range(7, 16)), (workers, steps)


def test_ctaugment_with_decoding_on_the_device_is_refused_by_name():
    from distssl.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="data.strong_aug=ctaugment needs data.decode_on=loader"):
        load_config("configs/demo.yaml", ["data.strong_aug=ctaugment", "data.decode_on=device"])
    with pytest.raises(ConfigError, match="data.ctaugment.decay"):
        load_config("configs/demo.yaml", ["data.ctaugment.decay=1"])


@pytest.mark.slow
def test_two_ranks_learn_one_policy_and_a_resume_draws_and_learns_exactly_the_same(tiny_data, tmp_path):
    import shutil

    from distssl.checkpoint import layout as ckpt

    def args(out):
        return tiny_overrides(tiny_data, out, **{"train.steps": 6, "train.ckpt_every": 2, "train.eval_every": 6,
                                                 "train.keep_checkpoints": 3, "data.strong_aug": "ctaugment",
                                                 "data.ctaugment.lag": 1, "train.num_workers": 1,
                                                 "data.augment_on": "device"})

    def saved(out, step):
        return [ckpt.load_rank_state(ckpt.rank_state_path(out / "checkpoints", ckpt.tag_for(step), rank))["augment"]
                for rank in (0, 1)]

    def logged(out):
        return {d["step"]: (d["loss"], d["cta_proximity"]) for d in map(json.loads, (out / "metrics.jsonl")
                                                                        .read_text().splitlines()) if "loss" in d}

    straight = tmp_path / "straight"
    r = run_train(args(straight), nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    at4 = saved(straight, 4)
    assert sorted(at4[0]["history"]) == [3, 4]  # the policies the loader may still draw with (lag 1)
    for step in (3, 4):  # one policy on both ranks
        assert torch.equal(at4[0]["history"][step], at4[1]["history"][step])
    assert not torch.equal(at4[0]["history"][4], torch.from_numpy(cta.initial_rates()))  # probes moved bins
    learned = json.loads((straight / "ctaugment.json").read_text())
    assert (straight / "ctaugment.png").exists() and learned["step"] == 6 and len(learned["weights"]) == len(POOL)
    assert np.allclose(learned["weights"], saved(straight, 6)[0]["history"][6].numpy().round(4))
    assert all(0 <= prox <= 1 for _, prox in logged(straight).values())

    # the same run killed after its step-4 checkpoint: the rerun draws the same views and learns the same policy
    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / ckpt.tag_for(6))
    for name in ("summary.json", "ctaugment.json", "ctaugment.png"):
        (resumed / name).unlink()
    r = run_train(args(resumed), nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout + r.stderr
    assert logged(resumed) == logged(straight) and sorted(logged(resumed)) == list(range(1, 7))
    assert torch.equal(saved(resumed, 6)[0]["history"][6], saved(straight, 6)[0]["history"][6])
    r = run_train(args(resumed) + ["train.steps=8", "data.strong_aug=randaugment"])
    assert r.returncode != 0 and "data.strong_aug" in r.stderr  # RandAugment cannot continue CTAugment's run
