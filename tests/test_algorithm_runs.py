"""ssl.algorithm end to end: a real run streams per-sample ids, saves the algorithm's state in the
checkpoint and a rerun continues from it."""
import json

import pytest
import torch

from conftest import run_train, tiny_overrides
from distssl.checkpoint import layout as ckpt


# FlexMatch: the per-sample state, fed by the stream's ids (the global-statistics algorithms are shown
# restored in test_algorithms.py and world-size independent on a real engine in test_invariance.py)
@pytest.mark.slow
@pytest.mark.parametrize("algorithm,key", [("flexmatch", "status"), ("temporal_ensembling", "count")])
def test_a_run_saves_its_algorithm_state_and_resumes_it(tiny_data, tmp_path, algorithm, key):
    out = tmp_path / "run"
    args = tiny_overrides(tiny_data, out, **{"train.steps": 4, "train.ckpt_every": 2, "train.eval_every": 4,
                                             "ssl.algorithm": algorithm, "train.num_workers": 1,
                                             "ssl.tau": 0.05})  # low: some predictions pass it in 4 steps
    r = run_train(args)
    assert r.returncode == 0, r.stderr[-3000:]
    _, tag, _ = ckpt.latest(out / "checkpoints")
    state = ckpt.load_rank_state(ckpt.rank_state_path(out / "checkpoints", tag, 0))["algorithm"]
    assert state["algorithm"] == algorithm and key in state
    if algorithm == "flexmatch":  # per-sample learning status, from the stream's sample ids
        assert state["status"].numel() == 600 and int((state["status"] >= 0).sum()) > 0
    else:  # the ensemble: one prediction counted per unlabeled sample the 4 steps read (4 x 8)
        assert state["count"].numel() == 600 and int(state["count"].sum()) == 4 * 8
    r = run_train(args + ["train.steps=6"])
    assert r.returncode == 0, r.stderr[-3000:]
    steps = [d["step"] for d in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in d]
    assert sorted(steps) == list(range(1, 7))
    if algorithm == "temporal_ensembling":  # the rerun went on from the saved ensemble, not a fresh one
        _, tag, _ = ckpt.latest(out / "checkpoints")
        resumed = ckpt.load_rank_state(ckpt.rank_state_path(out / "checkpoints", tag, 0))["algorithm"]
        assert int(resumed["count"].sum()) == 6 * 8
        assert torch.equal(resumed["values"][state["count"] > 0].float().sum(1) > 0,
                           torch.ones(int((state["count"] > 0).sum()), dtype=torch.bool))
    r = run_train(args + ["train.steps=8", "ssl.algorithm=fixmatch"])
    assert r.returncode == 2 and "ssl.algorithm" in r.stderr  # another algorithm is another run
    assert torch.is_tensor(state[key])
