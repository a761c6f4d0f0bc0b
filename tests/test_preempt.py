"""Preemption: a scheduler's signal makes every rank save at the next step boundary and exit 75;
the rerun resumes with no step lost or repeated (real 2-rank DeepSpeed runs)."""
import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from conftest import ROOT, run_train, tiny_overrides
from distssl.checkpoint import layout as ckpt
from distssl.distributed.preempt import PREEMPTED_EXIT
from support.servers import free_port, launch_env, train_command


def _launch(args, log: Path) -> subprocess.Popen:
    return subprocess.Popen(train_command(args, nproc=2, launcher="deepspeed"), stdout=log.open("w"),
                            stderr=subprocess.STDOUT,
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


def _saved_at_the_last_step(out: Path, log: str) -> int:
    """One complete checkpoint past the last periodic one (none), at the last step logged: its step."""
    saved = ckpt.complete_tags(out / "checkpoints")
    assert saved and saved[-1][0] >= 12, (saved, log[-2000:])
    step = saved[-1][0]
    assert step == _last_step(out)  # the step it saved is the last step it logged: none lost
    return step


def _saved_at_the_last_step_and_resumes(out: Path, args: list[str], log: str) -> None:
    """That checkpoint, and a 2-rank rerun that goes on from it: every step logged once."""
    step = _saved_at_the_last_step(out, log)
    r = run_train(args + [f"train.steps={step + 6}"], nproc=2, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    steps = _train_steps(out)
    assert sorted(steps) == list(range(1, step + 7))  # no step logged twice, none missing


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
    _saved_at_the_last_step_and_resumes(out, args, log)


def _torchrun(args, port: int) -> list[str]:
    return [str(Path(sys.executable).parent / "torchrun"), "--nproc-per-node", "2", "--master-port", str(port),
            str(ROOT / "launch/train.py"), "--config", str(ROOT / "configs/demo.yaml"), *args]


def _alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    return [p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def _listening_on(port: int) -> list:
    return [c for c in psutil.net_connections(kind="tcp") if c.laddr and c.laddr.port == port
            and c.status == psutil.CONN_LISTEN]


def _port_is_free(port: int, wait: float = 30) -> bool:
    """Nothing listens on the port, and the next job's rendezvous can bind it (as torch's store does,
    with SO_REUSEADDR) once the closed connections' FIN_WAIT states have passed."""
    deadline = time.time() + wait
    while True:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("0.0.0.0", port))
                s.listen()
                return True
            except OSError:
                if time.time() > deadline:
                    return False
        time.sleep(0.5)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("entry", ["deepspeed_runner", "supervised_runner", "torchrun", "two_nodes_no_ssh"])
def test_a_sigterm_to_the_command_the_user_started_saves_and_leaves_nothing_running(tiny_data, tmp_path, entry):
    """What a container's stop or scancel does: SIGTERM to the command the user typed, and to nothing else.
    DeepSpeed's runner dies at once without passing it on (its ranks watch their launchers); torchrun passes
    it to its ranks; on two nodes only node 0's runner gets it. Every rank saves at the same step, and
    no process of the run is left holding the rendezvous port."""
    out = tmp_path / "run"
    args = tiny_overrides(tiny_data, out, **{"train.steps": 3000, "train.ckpt_every": 1000, "train.eval_every": 1000,
                                             "train.num_workers": 1})
    port = free_port()
    if entry == "deepspeed_runner":
        cmds = [train_command(args, nproc=2, master_port=port, launcher="deepspeed")]
    elif entry == "supervised_runner":  # the container command the README gives
        cmds = [[sys.executable, str(ROOT / "launch/supervise.py"), *train_command(args, nproc=2, master_port=port,
                                                                           launcher="deepspeed")]]
    elif entry == "torchrun":
        cmds = [_torchrun(args, port)]
    else:
        hosts = tmp_path / "hosts"
        hosts.write_text("127.0.0.1 slots=1\nlocalhost slots=1\n")
        cmds = [train_command(args, hostfile=hosts, node_rank=r, master_port=port) for r in (0, 1)]
    logs = [tmp_path / f"node{i}.log" for i in range(len(cmds))]
    procs = [subprocess.Popen(c, stdout=log.open("w"), stderr=subprocess.STDOUT, env=launch_env(), cwd=ROOT)
             for c, log in zip(cmds, logs)]
    deadline = time.time() + 240
    while _last_step(out) < 12 and time.time() < deadline and all(p.poll() is None for p in procs):
        time.sleep(0.2)
    text = lambda: "".join(log.read_text()[-2500:] for log in logs)  # noqa: E731
    assert all(p.poll() is None for p in procs), text()
    run = [q for p in procs for q in [psutil.Process(p.pid), *psutil.Process(p.pid).children(recursive=True)]]
    assert len([q for q in run if q.pid != procs[0].pid]) >= 4, run  # launchers, ranks, loader workers
    procs[0].send_signal(signal.SIGTERM)
    t0 = time.time()
    if entry == "supervised_runner":  # it returns the run's status, and only once nothing of the run is left
        assert procs[0].wait(timeout=90) == PREEMPTED_EXIT, text()
        assert not _alive(run[1:]), _alive(run[1:])
    while _alive(run) and time.time() - t0 < 90:
        time.sleep(0.2)
    took = time.time() - t0
    for p in procs:
        p.wait(timeout=30)
    assert not _alive(run) and took < 60, (took, _alive(run), text())  # within a pod's 30-60 s grace period
    t1 = time.time()
    while _listening_on(port) and time.time() - t1 < 5:  # the kernel closes a dead process's sockets
        time.sleep(0.2)
    assert not _listening_on(port) and _port_is_free(port), [
        c for c in psutil.net_connections(kind="tcp") if c.laddr and c.laddr.port == port]
    # torchrun answers SIGTERM with a traceback of its own (SignalException: ... got signal: 15); no rank does
    launcher_tracebacks = text().count("SignalException: Process") if entry == "torchrun" else 0
    assert "preempted by" in text() and text().count("Traceback") == launcher_tracebacks, text()
    # a complete checkpoint, all ranks at one step, the last logged: resuming from it does not depend on
    # who passed the signal on, and test_a_preempted_run_saves_at_the_next_step_and_resumes... reruns one
    _saved_at_the_last_step(out, text())


def test_a_rank_watches_its_launchers_but_not_the_shell_above_them(tmp_path):
    """The chain is the launchers above a rank (this test's pytest is none: no chain); a launcher is lost
    when its child has another parent; the topmost launcher's own parent (the shell of `nohup deepspeed
    ... &`, which may exit) is not watched."""
    import os

    from distssl.distributed.preempt import Launcher, launcher_chain, lost_launcher
    from distssl.distributed.procs import parent_of

    me = os.getpid()
    assert launcher_chain(me) == []
    launch = Launcher(os.getppid(), "deepspeed.launcher.launch")
    assert lost_launcher(me, [launch]) is None  # my parent is still this "launcher"
    assert lost_launcher(me, [launch, Launcher(parent_of(launch.pid), "deepspeed")]) is None  # and its, its
    assert lost_launcher(me, [launch, Launcher(12345678, "deepspeed")]).pid == 12345678  # its parent is another
    assert lost_launcher(me, [Launcher(12345678, "torchrun")]).pid == 12345678  # mine is another
