"""Real 2-process DeepSpeed runs on CPU (gloo): ZeRO-2 and ZeRO-3 train, checkpoint and resume."""
import json
from pathlib import Path

import pytest
import torch

from conftest import run_train, tiny_overrides


def _metrics(out: Path) -> list[dict]:
    return [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]


def _rank_states(out: Path, step: int) -> list[dict]:
    d = out / "checkpoints" / f"step_{step:08d}"
    return [torch.load(p, weights_only=True) for p in sorted(d.glob("distssl_rank*.pt"))]


def _check(r):
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


@pytest.fixture(scope="module")
def zero2_run(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("z2") / "run"
    first = run_train(tiny_overrides(tiny_data, out, **{"train.steps": 4, "train.ckpt_every": 2,
                                                        "train.eval_every": 4, "deepspeed.zero_stage": 2}), nproc=2)
    _check(first)
    after_first = {"metrics": _metrics(out), "states": _rank_states(out, 4)}
    second = run_train(tiny_overrides(tiny_data, out, **{"train.steps": 6, "train.ckpt_every": 2,
                                                         "train.eval_every": 4, "deepspeed.zero_stage": 2}), nproc=2)
    _check(second)
    return out, after_first, second


@pytest.mark.slow
@pytest.mark.distributed
def test_zero2_two_ranks_train_and_write_outputs(zero2_run):
    out, first, _ = zero2_run
    train = [m for m in first["metrics"] if m["kind"] == "train"]
    assert [m["step"] for m in train] == [1, 2, 3, 4]
    for key in ("loss", "loss_x", "loss_u", "mask_rate", "pseudo_acc", "lr", "img_s"):
        assert key in train[0]
    ev = [m for m in first["metrics"] if m["kind"] == "eval"]
    assert ev and ev[0]["eval_images"] == 97 and 0 <= ev[0]["top1"] <= 1  # each eval image once
    assert (out / "config.yaml").exists() and (out / "curves.png").stat().st_size > 1000
    assert list((out / "tb").glob("events.out.tfevents.*"))
    # the export's softmax temperature, fitted on the 97 eval images gathered from both ranks
    meta = json.loads((out / "model.json").read_text())
    assert meta["temperature"] > 0 and meta["eval_nll_after"] <= meta["eval_nll_before"] + 1e-9
    assert "data.eval" in meta["temperature_fitted_on"] and 0 <= meta["eval_ece_after"] <= 1
    # per class: every eval image counted once in its class, and the confusion picture
    summary = json.loads((out / "summary.json").read_text())
    per_class = summary["per_class"]
    assert sum(c["count"] for c in per_class.values()) == 97 and len(per_class) == 10
    hits = sum(round(c["accuracy"] * c["count"]) for c in per_class.values() if c["count"])
    assert hits == round(summary["top1"] * 97)  # the classes' hits add up to the run's top-1
    assert (out / "confusion.png").stat().st_size > 1000


@pytest.mark.slow
@pytest.mark.distributed
def test_zero2_resume_continues_step_count_and_da_state(zero2_run):
    out, first, second = zero2_run
    assert "resumed from" in second.stdout + second.stderr
    steps = [m["step"] for m in _metrics(out) if m["kind"] == "train"]
    assert steps == [1, 2, 3, 4, 5, 6]  # no restart, no duplicated steps
    s4 = first["states"]
    # every rank holds the same p_model, and resuming started from it (not from scratch)
    assert torch.equal(s4[0]["algorithm"]["da"]["p_model"], s4[1]["algorithm"]["da"]["p_model"])
    # each rank's BatchNorm statistics come from its own samples; the EMA's are averaged over ranks at
    # eval, so both ranks evaluated (and the export holds) one model
    buffers = [s["ema"]["buffers"] for s in s4]
    assert any("running_mean" in k for k in buffers[0])
    assert all(torch.equal(buffers[0][k], buffers[1][k]) for k in buffers[0])
    s6 = _rank_states(out, 6)
    assert s6[0]["run"]["step"] == 6
    assert torch.equal(s6[0]["algorithm"]["da"]["p_model"], s6[1]["algorithm"]["da"]["p_model"])
    assert not torch.equal(s6[0]["algorithm"]["da"]["p_model"], s4[0]["algorithm"]["da"]["p_model"])
    assert all(s6[r]["feed"]["cursors"]["unlabeled"] != s4[r]["feed"]["cursors"]["unlabeled"] for r in (0, 1))
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == ["step_00000004", "step_00000006"]


@pytest.mark.slow
@pytest.mark.distributed
def test_zero3_trains_resumes_and_evaluates_ema_like_zero2(tiny_data, tmp_path, zero2_run):
    out = tmp_path / "run"
    kv = {"train.steps": 4, "train.ckpt_every": 2, "train.eval_every": 4, "deepspeed.zero_stage": 3}
    _check(run_train(tiny_overrides(tiny_data, out, **kv), nproc=2))
    z3_eval = [m for m in _metrics(out) if m["kind"] == "eval"][-1]
    z2_eval = [m for m in zero2_run[1]["metrics"] if m["kind"] == "eval"][-1]
    # same seed, data and global batch: each rank's EMA partition is its slice of the full EMA ...
    z2_ema = zero2_run[1]["states"][0]["ema"]["shadow"]
    z3_parts = [s["ema"]["shadow"] for s in _rank_states(out, 4)]
    for name, full in z2_ema.items():
        assert z3_parts[0][name].ndim == 1 and z3_parts[0][name].numel() < full.numel()  # partitioned
        gathered = torch.cat([p[name] for p in z3_parts])[: full.numel()].view_as(full)
        torch.testing.assert_close(gathered, full, rtol=1e-4, atol=1e-5, msg=name)
    # ... and evaluating the swapped-in partitions gives what the full weights give
    assert z3_eval["eval_images"] == 97
    for key in ("top1", "top5"):
        assert abs(z3_eval[key] - z2_eval[key]) <= 0.03, (z3_eval, z2_eval)
    # the export gathers the partitions into the full fp32 EMA, the same as the offline reassembly
    from safetensors.torch import load_file

    from distssl.models.export import ema_weights_from_run
    exported = load_file(str(out / "model.safetensors"))
    offline, info = ema_weights_from_run(out)
    assert info["step"] == 4 and exported.keys() == offline.keys()
    for name, full in z2_ema.items():
        assert torch.equal(exported[name], offline[name]), name
        torch.testing.assert_close(exported[name], full, rtol=1e-4, atol=1e-5, msg=name)
    r = run_train(tiny_overrides(tiny_data, out, **{**kv, "train.steps": 5}), nproc=2)
    _check(r)
    assert "resumed from" in r.stdout + r.stderr
    assert [m["step"] for m in _metrics(out) if m["kind"] == "train"] == [1, 2, 3, 4, 5]


@pytest.mark.slow
@pytest.mark.distributed
def test_eval_counts_each_image_once_over_two_ranks_and_two_loader_workers_each(tiny_data, tmp_path):
    out = tmp_path / "run"
    r = run_train(tiny_overrides(tiny_data, out, **{"train.steps": 1, "train.eval_every": 1,
                                                    "train.num_workers": 2, "train.eval_batch_size": 8}), nproc=2)
    _check(r)
    ev = [m for m in _metrics(out) if m["kind"] == "eval"][-1]
    assert ev["eval_images"] == 97  # a prime: 3 shards over 4 workers, split by sample, none twice
    # the labeled set has 1 shard for 4 readers: no hang, and the log says what to do about it
    assert "data.labeled has 1 shard(s) for 4 readers" in r.stdout + r.stderr



@pytest.mark.slow
@pytest.mark.distributed
def test_vit_with_activation_checkpointing_under_zero3(tiny_data, tmp_path):
    """The large-backbone switch: timm's set_grad_checkpointing inside ZeRO-3's parameter gathering."""
    out = tmp_path / "vit"
    _check(run_train(tiny_overrides(tiny_data, out, **{"train.steps": 2, "train.eval_every": 2,
                                                       "model.name": "test_vit", "model.grad_checkpointing": "true",
                                                       "deepspeed.zero_stage": 3, "data.image_size": 32}), nproc=2))
    train = [m for m in _metrics(out) if m["kind"] == "train"]
    assert [m["step"] for m in train] == [1, 2] and all(m["loss"] == m["loss"] for m in train)  # no NaN
    assert (out / "model.safetensors").exists()
