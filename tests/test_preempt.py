"""Preemption: a scheduler's signal makes every rank save at the next step boundary and exit 75;
the rerun resumes with no step lost or repeated (real 2-rank DeepSpeed runs)."""
import json
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from conftest import ROOT, run_train, tiny_overrides
from distssl import checkpoint as ckpt
from distssl.preempt import PREEMPTED_EXIT
from distssl.testing import launch_env, train_command


def _launch(args, log: Path) -> subprocess.Popen:
    return subprocess.Popen(train_command(args, nproc=2), stdout=log.open("w"), stderr=subprocess.STDOUT,
                            env=launch_env(), cwd=ROOT)


def _last_step(out: Path) -> int:
    try:
        lines = (out / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    return max([json.loads(x).get("step", 0) for x in lines if x.strip()] or [0])


def _ranks(launcher: subprocess.Popen) -> tuple[psutil.Process, list[psutil.Process]]:
    """(DeepSpeed's per-node launcher, the rank processes), found below the `deepspeed` runner."""
    node = next(p for p in psutil.Process(launcher.pid).children(recursive=True)
                if "deepspeed.launcher.launch" in " ".join(p.cmdline()))
    return node, [p for p in node.children() if "launch/train.py" in " ".join(p.cmdline())]


def _train_steps(out: Path) -> list[int]:
    return [d["step"] for d in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            if "loss" in d and "step" in d]


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("how", ["usr1_to_every_rank", "sigterm_to_the_launcher"])
def test_a_preempted_run_saves_at_the_next_step_and_resumes_with_no_step_lost(tiny_data, tmp_path, how):
    out = tmp_path / "run"
    args = tiny_overrides(tiny_data, out, **{"train.steps": 3000, "train.ckpt_every": 1000, "train.eval_every": 1000,
                                             "train.num_workers": 1})
    proc = _launch(args, tmp_path / "a.log")
    deadline = time.time() + 240
    while _last_step(out) < 12 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert proc.poll() is None, (tmp_path / "a.log").read_text()[-3000:]
    node, ranks = _ranks(proc)
    t0 = time.time()
    if how == "usr1_to_every_rank":  # SLURM's --signal: every process of the step, loader workers included
        for p in ranks + [c for r in ranks for c in r.children(recursive=True)]:
            p.send_signal(signal.SIGUSR1)
    else:  # what a SIGTERM to DeepSpeed's launcher does: each rank's tree in turn, 30 s grace each
        node.send_signal(signal.SIGTERM)
    rc = proc.wait(timeout=120)
    took = time.time() - t0
    log = (tmp_path / "a.log").read_text()
    assert rc != 0 and took < 60, log[-3000:]
    if how == "usr1_to_every_rank":
        assert rc == PREEMPTED_EXIT, log[-3000:]
    assert "preempted by SIG" in log and "Traceback" not in log, log[-3000:]
    saved = ckpt.complete_tags(out / "checkpoints")
    assert saved and saved[-1][0] >= 12, (saved, log[-2000:])  # past the last periodic checkpoint (none)
    step = saved[-1][0]
    assert step == _last_step(out)  # the step it saved is the last step it logged: none lost

    r = run_train(args + [f"train.steps={step + 6}"], nproc=2, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    steps = _train_steps(out)
    assert len(steps) == len(set(steps)) and max(steps) == step + 6  # no step logged twice, none missing
    assert sorted(steps) == list(range(1, step + 7))
