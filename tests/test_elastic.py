"""Elastic resume: a run saved on N ranks resumes on M (2 -> 1, 1 -> 2; ZeRO-2 and ZeRO-3) and with
another train.num_workers: weights, the optimizer's state (SGD momentum, AdamW moments), EMA, the
algorithm's state (Temporal Ensembling's per-sample ensemble) and the lr schedule come back exactly;
VAT, whose power iteration backpropagates to the input outside the engine, trains under ZeRO-3 on
one rank and on two."""
import json
import subprocess
from pathlib import Path

import pytest

from conftest import ROOT, run_train, tiny_overrides
from support.servers import launch_env, ranks_command


def _check(args: list[str], nproc: int, out_json: Path) -> dict:
    r = subprocess.run(ranks_command(ROOT / "tests/workers/elastic_check.py", [out_json, *args], nproc=nproc),
                       capture_output=True, text=True, timeout=300, cwd=ROOT, env=launch_env())
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(out_json.read_text())


def _train_steps(out: Path) -> list[int]:
    return [d["step"] for d in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            if "loss" in d and "step" in d]


# both directions and both partitioned stages, in two runs (each case costs ~40 s of the suite)
# and both kinds of optimizer state: SGD's momentum, AdamW's two moments and its step count
@pytest.mark.slow
@pytest.mark.distributed
# (training on after the resume is shown once: it costs ~15 s a case)
@pytest.mark.parametrize("zero,before,after,optimizer,state_keys,algorithm,train_on", [
    (2, 2, 1, "sgd", {"momentum_buffer"}, "temporal_ensembling", False),
    (3, 1, 2, "adamw", {"exp_avg", "exp_avg_sq"}, "vat", True)])
def test_a_run_saved_on_n_ranks_resumes_on_m_with_its_state_exact(tiny_data, tmp_path, zero, before, after,
                                                                  optimizer, state_keys, algorithm, train_on):
    out = tmp_path / "run"
    args = tiny_overrides(tiny_data, out, **{"train.steps": 6, "train.ckpt_every": 6, "train.eval_every": 6,
                                             "deepspeed.zero_stage": zero, "train.num_workers": 1,
                                             "optim.name": optimizer, "ssl.algorithm": algorithm})
    r = run_train(args, nproc=before, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    state = _check(args, after, tmp_path / "check.json")
    assert state["exact"] and state["step"] == 6, state
    assert set(state["optimizer_state"]) == state_keys and min(state["optimizer_state"].values()) > 0, state
    if algorithm == "temporal_ensembling":  # the ensemble came over whole: 6 steps x 8 unlabeled images counted
        assert state["algorithm_state"]["count"] == [600, 6 * 8], state
    if not train_on:
        return
    # and the run goes on from there on the new number of ranks, no step repeated
    r = run_train(args + ["train.steps=10", "train.num_workers=2"], nproc=after, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed" in r.stderr and "loader readers" in r.stderr
    assert sorted(_train_steps(out)) == list(range(1, 11))
