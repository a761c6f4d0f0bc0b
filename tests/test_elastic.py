"""Elastic resume: a run saved on N ranks resumes on M (2 -> 1, 1 -> 2; ZeRO-2 and ZeRO-3) and with
another train.num_workers: weights, SGD momentum, EMA, DA and the lr schedule come back exactly."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, free_port, run_train, tiny_overrides


def _check(args: list[str], nproc: int, out_json: Path) -> dict:
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(nproc), "--master_port", str(free_port()),
           str(ROOT / "tests/workers/elastic_check.py"), str(out_json), *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT,
                       env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(out_json.read_text())


def _train_steps(out: Path) -> list[int]:
    return [d["step"] for d in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            if "loss" in d and "step" in d]


# both directions and both partitioned stages, in two runs (each case costs ~40 s of the suite)
@pytest.mark.parametrize("zero,before,after", [(2, 2, 1), (3, 1, 2)])
def test_a_run_saved_on_n_ranks_resumes_on_m_with_its_state_exact(tiny_data, tmp_path, zero, before, after):
    out = tmp_path / "run"
    args = tiny_overrides(tiny_data, out, **{"train.steps": 6, "train.ckpt_every": 6, "train.eval_every": 6,
                                             "deepspeed.zero_stage": zero, "train.num_workers": 1})
    r = run_train(args, nproc=before, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    state = _check(args, after, tmp_path / "check.json")
    assert state["exact"] and state["step"] == 6 and state["momentum"] > 0, state
    # and the run goes on from there on the new number of ranks, no step repeated
    r = run_train(args + ["train.steps=10", "train.num_workers=2"], nproc=after, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed" in r.stderr and "loader readers" in r.stderr
    assert sorted(_train_steps(out)) == list(range(1, 11))
