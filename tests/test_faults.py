"""Faults with real processes: a rank SIGKILLed mid-run, and a peer that stops answering."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from conftest import ROOT, tiny_overrides
from support.servers import launch_env, train_command


def _launch(args, log: Path) -> subprocess.Popen:
    return subprocess.Popen(train_command(args, nproc=2, launcher="deepspeed"), stdout=log.open("w"),
                            stderr=subprocess.STDOUT,
                            env=launch_env(), cwd=ROOT,
                            start_new_session=True)


def _last_step(out: Path) -> int:
    try:
        lines = (out / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    steps = [json.loads(l)["step"] for l in lines if l.strip().startswith("{")]
    return max(steps, default=0)


def _rank_pid(launcher: subprocess.Popen, rank: int) -> int:
    for child in psutil.Process(launcher.pid).children(recursive=True):
        try:
            if f"--local_rank={rank}" in child.cmdline():
                return child.pid
        except psutil.NoSuchProcess:
            continue
    raise AssertionError(f"rank {rank} process not found")


def _wait_for_step(proc, out: Path, step: int, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while _last_step(out) < step:
        assert proc.poll() is None, "the run ended before the fault was injected"
        assert time.time() < deadline, "the run did not get going"
        time.sleep(0.5)


@pytest.mark.slow
@pytest.mark.distributed
def test_sigkilled_rank_fails_the_launcher_and_the_same_command_resumes(tiny_data, tmp_path):
    out = tmp_path / "run"
    args = tiny_overrides(tiny_data, out, **{"train.steps": 14, "train.ckpt_every": 4, "train.eval_every": 14})
    proc = _launch(args, tmp_path / "a.log")
    _wait_for_step(proc, out, 6)  # past the checkpoint at step 4
    os.kill(_rank_pid(proc, 1), signal.SIGKILL)
    rc = proc.wait(timeout=180)
    log = (tmp_path / "a.log").read_text()
    assert rc != 0
    assert "exits with return code" in log  # DeepSpeed's launcher reports it (which rank: see below)
    killed_at = _last_step(out)

    proc = _launch(args, tmp_path / "b.log")
    assert proc.wait(timeout=300) == 0, (tmp_path / "b.log").read_text()[-3000:]
    log = (tmp_path / "b.log").read_text()
    resumed = int(log.split("resumed from")[1].split("at step")[1].split()[0])
    assert 4 <= resumed <= killed_at
    steps = [json.loads(l)["step"] for l in (out / "metrics.jsonl").read_text().splitlines()
             if json.loads(l)["kind"] == "train"]
    assert steps == list(range(1, 15))  # the curve continues: no restart, no duplicated steps
    assert (out / "model.safetensors").exists()


@pytest.mark.slow
@pytest.mark.distributed
def test_a_peer_that_stops_answering_fails_the_run_within_the_timeout(tiny_data, tmp_path):
    out = tmp_path / "run"
    args = tiny_overrides(tiny_data, out, **{"train.steps": 100000, "train.ckpt_every": 0, "train.eval_every": 0,
                                             "deepspeed.timeout_minutes": 0.3})
    proc = _launch(args, tmp_path / "a.log")
    _wait_for_step(proc, out, 3)
    victim = _rank_pid(proc, 1)
    rank0 = psutil.Process(_rank_pid(proc, 0))
    os.kill(victim, signal.SIGSTOP)  # alive but silent: no connection is closed, only the timeout helps
    t0 = time.time()
    try:
        rank0.wait(timeout=200)  # rank 0 gives up on its own, with a message
        elapsed = time.time() - t0
    finally:
        # DeepSpeed's launcher then SIGTERMs the others and waits: a frozen process needs SIGKILL
        # (on a cluster the scheduler does that); after it the launcher exits non-zero.
        os.kill(victim, signal.SIGKILL)
    rc = proc.wait(timeout=60)
    log = (tmp_path / "a.log").read_text()
    assert rc != 0
    assert elapsed < 50, elapsed  # the 18-s timeout, not torch's default 30 minutes
    assert "rank 0: a collective failed" in log and "rank 1 (pid" in log and "is stopped" in log, log[-3000:]
    assert "Rerun the same command" in log


@pytest.mark.slow
def test_the_peer_watch_names_a_local_rank_the_moment_it_dies(tmp_path, capfd):
    """The thread every rank runs: a peer process on this host that dies is named (rank, pid, step)
    within a fraction of a second, before DeepSpeed's launcher (which polls once a second) stops the rest."""
    from distssl.distributed.peers import watch_local_peers, write_heartbeat

    peer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    write_heartbeat(tmp_path, 0, 7)
    (tmp_path / "ranks" / "rank00001.json").write_text(json.dumps(
        {"rank": 1, "host": __import__("socket").gethostname(), "pid": peer.pid, "step": 7, "time": time.time()}))
    watch_local_peers(tmp_path, 0, local_peers=1, interval=0.05)
    time.sleep(0.3)
    assert "a peer died" not in capfd.readouterr().err  # alive: nothing to say
    peer.send_signal(signal.SIGSTOP)  # paused (Ctrl-Z, a debugger) is not dead: it may resume
    time.sleep(0.3)
    assert "a peer died" not in capfd.readouterr().err
    peer.send_signal(signal.SIGCONT)
    peer.kill()
    time.sleep(0.5)  # not reaped: a zombie counts as exited
    err = capfd.readouterr().err
    peer.wait()
    assert f"rank 0: a peer died: rank 1 (pid {peer.pid}" in err and "last at step 7" in err, err


@pytest.mark.slow
def test_a_peer_that_finished_its_run_first_is_not_named_dead(tmp_path, capfd):
    """In a Ray Train trial rank 1 ends while rank 0 still exports and plots: its exit, after its heartbeat
    said done, is no death (a 'rerun the same command' after a finished trial would mislead)."""
    from distssl.distributed.peers import watch_local_peers, write_heartbeat

    peer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    host = __import__("socket").gethostname()
    write_heartbeat(tmp_path, 0, 7)
    (tmp_path / "ranks" / "rank00001.json").write_text(json.dumps(
        {"rank": 1, "host": host, "pid": peer.pid, "step": 7, "time": time.time()}))
    watch_local_peers(tmp_path, 0, local_peers=1, interval=0.05)
    time.sleep(0.3)
    (tmp_path / "ranks" / "rank00001.json").write_text(json.dumps(
        {"rank": 1, "host": host, "pid": peer.pid, "step": 7, "time": time.time(), "done": True}))
    peer.kill()
    peer.wait()
    time.sleep(0.5)
    assert "a peer died" not in capfd.readouterr().err
