"""Real Ray Tune sweeps on CPU: ASHA over tau, lambda_u and mu, restore after a kill, bad keys."""
import csv
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from conftest import ROOT, tiny_overrides

TUNE_CFG = str(ROOT / "configs/tune/demo.yaml")


def _tune(args, timeout=400, config=TUNE_CFG, **kw):
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "RAY_DEDUP_LOGS": "0"}
    return subprocess.run([sys.executable, str(ROOT / "launch/tune.py"), "--config", config, *args],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT, **kw)


def _rows(sweep):
    with open(sweep / "results.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_a_bad_search_key_is_named_before_any_trial_starts(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"base": str(ROOT / "configs/demo.yaml"),
                                   "space": {"ssl.taux": {"choice": [0.9]}}}))
    r = subprocess.run([sys.executable, str(ROOT / "launch/tune.py"), "--config", str(bad),
                        f"run.out_dir={tmp_path / 's'}"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "ssl.taux" in r.stderr and "Traceback" not in r.stderr
    bad.write_text(yaml.safe_dump({"base": str(ROOT / "configs/demo.yaml"),
                                   "space": {"ssl.tau": {"uniform": [0.5, 1.5]}}}))
    r = subprocess.run([sys.executable, str(ROOT / "launch/tune.py"), "--config", str(bad),
                        f"run.out_dir={tmp_path / 's'}"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "space.ssl.tau" in r.stderr
    assert not (tmp_path / "s" / "ray").exists()


@pytest.mark.slow
@pytest.mark.ray
def test_sweep_with_asha_writes_results_and_a_best_config_that_trains(tiny_data, tmp_path):
    sweep = tmp_path / "sweep"
    args = tiny_overrides(tiny_data, sweep, **{"train.steps": 6, "train.eval_every": 2})
    r = _tune([*args, "tune.num_samples=2", "tune.num_cpus=2"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    console = r.stdout + r.stderr
    # what a user reads: each trial's searched values (Tune's table and its best trial), not ~60 base
    # keys beside them; no notice of a deprecated Ray API (the sweep uses Train V2 as Ray intends);
    # no rank 'died' when it finished its run before rank 0 wrote the outputs
    assert "ssl.lambda_u" in console and "'ssl.tau': " in console
    assert "data.labeled" not in console and "'base'" not in console and "ObjectRef" not in console
    assert "deprecat" not in console.lower() and "a peer died" not in console
    rows = _rows(sweep)
    assert len(rows) == 2
    assert {"ssl.tau", "ssl.lambda_u", "ssl.mu", "best_top1", "last_top1", "steps", "status"} <= set(rows[0])
    tops = [float(r["best_top1"]) for r in rows]
    assert tops == sorted(tops, reverse=True)
    assert all(float(r["ssl.tau"]) in (0.8, 0.9, 0.95) and 2 <= int(r["ssl.mu"]) <= 7 for r in rows)
    assert (sweep / "sweep.png").stat().st_size > 2000
    best = yaml.safe_load((sweep / "best_config.yaml").read_text())
    assert best["ssl"]["tau"] == float(rows[0]["ssl.tau"]) and best["ssl"]["mu"] == int(rows[0]["ssl.mu"])
    # the user's settings (demo.yaml's and the command line's), not what the tune file imposed on its
    # trials (configs/tune/demo.yaml: train.ckpt_every 0): a run from it makes periodic checkpoints
    trials = yaml.safe_load(next((sweep / "trials").glob("*/config.yaml")).read_text())
    assert trials["train"]["ckpt_every"] == 0 and best["train"]["ckpt_every"] == 100
    assert best["train"]["steps"] == 6 and best["data"]["labeled"] == tiny_data["labeled"]
    out = tmp_path / "from_best"
    r = subprocess.run([sys.executable, str(ROOT / "launch/train.py"), "--config", str(sweep / "best_config.yaml"),
                        f"run.out_dir={out}", "train.steps=2", "train.eval_every=2"],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert (out / "summary.json").exists()


@pytest.mark.slow
@pytest.mark.ray
def test_a_killed_sweep_resumes_and_grows_without_rerunning_finished_trials(tiny_data, tmp_path):
    sweep = tmp_path / "sweep"
    args = [*tiny_overrides(tiny_data, sweep, **{"train.steps": 4, "train.eval_every": 2, "train.ckpt_every": 0}),
            "tune.num_samples=2", "tune.max_concurrent_trials=1", "tune.num_cpus=2", "tune.scheduler=fifo"]
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "launch/tune.py"), "--config", TUNE_CFG, *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=ROOT,
                            start_new_session=True)
    deadline, done = time.time() + 300, False
    while time.time() < deadline and not done:  # until Ray's own state records a finished trial
        states = (sweep / "ray" / "sweep").glob("experiment_state*.json") if (sweep / "ray").exists() else []
        done = any("TERMINATED" in p.read_text(errors="ignore") for p in states)
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert done, "no trial finished before the kill"
    finished = {p.parent.name: p.stat().st_mtime for p in (sweep / "trials").glob("*/summary.json")}
    assert finished
    assert not (sweep / "results.csv").exists()
    # the rerun resumes the killed sweep and grows it by one trial in the same command: the finished
    # trial is not run again, the unfinished one and the new one are
    r = _tune([*args[:-4], "tune.num_samples=3", "tune.max_concurrent_trials=1", "tune.num_cpus=2",
               "tune.scheduler=fifo"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = _rows(sweep)
    assert len(rows) == 3 and all(row["status"] == "TERMINATED" for row in rows)
    for name, mtime in finished.items():  # finished trials were not run again
        assert (sweep / "trials" / name / "summary.json").stat().st_mtime == mtime
    assert len(list((sweep / "trials").glob("*/summary.json"))) == 3
    # rerunning the finished sweep trains nothing, and writes its results again
    lines = {p.parent.name: len(p.read_text().splitlines()) for p in (sweep / "trials").glob("*/metrics.jsonl")}
    (sweep / "results.csv").unlink()
    r = _tune([*args[:-4], "tune.num_samples=3", "tune.num_cpus=2", "tune.scheduler=fifo"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert len(_rows(sweep)) == 3
    assert {p.parent.name: len(p.read_text().splitlines()) for p in (sweep / "trials").glob("*/metrics.jsonl")} == lines
    r = _tune([*args[:-4], "tune.num_samples=2", "tune.num_cpus=2", "tune.scheduler=fifo"])
    assert r.returncode == 2 and "already has 3 trials: a sweep grows and never shrinks" in r.stderr, r.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.ray
def test_a_trial_can_be_a_two_process_deepspeed_run_reporting_every_rank(tiny_data, tmp_path):
    """Each trial a 2-rank Train V2 run; a trial whose values are wrong only once its ranks exist (a batch
    of 3 on 2 ranks) fails alone, once, with the cause in results.csv, and the sweep still has a best."""
    sweep = tmp_path / "sweep"
    cfg = tmp_path / "sweep.yaml"
    cfg.write_text(yaml.safe_dump({"base": str(ROOT / "configs/demo.yaml"),
                                   "space": {"train.batch_size": {"grid": [4, 3]}}}))
    args = tiny_overrides(tiny_data, sweep, **{"train.steps": 2, "train.eval_every": 2, "train.ckpt_every": 0})
    r = _tune([*args, "tune.num_samples=1", "tune.workers_per_trial=2", "tune.num_cpus=2"], config=str(cfg))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = {int(row["train.batch_size"]): row for row in _rows(sweep)}
    assert rows[4]["status"] == "TERMINATED" and int(rows[4]["steps"]) == 2
    assert rows[3]["status"] == "ERROR" and "divisible" in rows[3]["error"] and rows[3]["error"].startswith(
        "config error:"), rows[3]
    assert yaml.safe_load((sweep / "best_config.yaml").read_text())["train"]["batch_size"] == 4
    # the checkpoint Ray keeps holds both ranks' state (ZeRO shards + EMA/DA/cursors), not rank 0's alone
    names = {p.name for p in (sweep / "ray").rglob("checkpoint_*/*")}
    assert {"distssl_rank00000.pt", "distssl_rank00001.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
            "zero_pp_rank_1_mp_rank_00_optim_states.pt", "COMPLETE"} <= names
    r = _tune([*args, "tune.num_samples=1", "tune.workers_per_trial=3", "tune.num_cpus=2",
               f"run.out_dir={tmp_path / 'too_big'}"])
    assert r.returncode == 2 and "tune.workers_per_trial=3" in r.stderr
