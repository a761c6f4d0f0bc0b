"""The process group and the peers: starting it (gloo on CPU, nccl on GPU, our collective timeout),
how many CPU threads a rank takes, and telling which rank died (heartbeats, a watcher thread).

Kept out of the training loop (distssl/train/trainer.py), which only calls :func:`init_distributed`,
:func:`write_heartbeat` and :func:`watch_local_peers`.
"""
from __future__ import annotations

import errno
import json
import os
import signal
import socket
import sys
import threading
import time
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from distssl.distributed.procs import process_state
from distssl.errors import PortInUse
from distssl.storage import atomic

# a heartbeat older than this process is an earlier run's: its ranks are not this run's peers (every
# rank of a run starts before the rendezvous, and writes its first heartbeat after it)
PROCESS_START = time.time()

# --- process group ------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def use_cuda() -> bool:
    return torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") != "cpu"


def _port_in_use(port: int) -> PortInUse:
    addr = os.environ.get("MASTER_ADDR", "127.0.0.1")
    return PortInUse(f"the rendezvous port {port} (MASTER_PORT, on MASTER_ADDR {addr}) is in use by another "
                     f"process, so the ranks cannot meet; rerunning the same command fails the same way. Pick a "
                     f"free port: deepspeed --master_port N ..., torchrun --master-port N ..., or MASTER_PORT=N "
                     f"(`ss -ltnp 'sport = :{port}'` shows who holds it)")


def check_rendezvous_port() -> None:
    """Rank 0 hosts the rendezvous (torch's TCPStore on MASTER_PORT, every interface) unless torchrun's
    agent already does: a port another process listens on is named here, before the ranks wait on it."""
    port = os.environ.get("MASTER_PORT", "")
    if os.environ.get("RANK") != "0" or not port.isdigit() or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        return
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as TCPStore binds: TIME_WAIT is no conflict
        try:
            s.bind(("", int(port)))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise _port_in_use(int(port)) from None
            raise


def _is_address_in_use(e: BaseException) -> bool:
    """torch's TCPStore reports a taken port only in its message (DistNetworkError, 'EADDRINUSE')."""
    return isinstance(e, getattr(dist, "DistNetworkError", ())) and "EADDRINUSE" in str(e)


def is_peer_failure(e: BaseException) -> bool:
    """A collective that failed because another rank is gone (gloo/nccl errors, timeouts); not a mistake
    of the user's (a taken port is a PortInUse, raised before any collective)."""
    if isinstance(e, PortInUse) or _is_address_in_use(e):
        return False
    text = str(e)
    return isinstance(e, getattr(dist, "DistError", ())) or any(
        k in text for k in ("Connection closed by peer", "Connection reset by peer", "Timed out", "timed out",
                            "NCCL", "gloo", "ProcessGroup"))


def init_distributed(timeout_minutes: float) -> tuple[int, int, int]:
    """(rank, world size, local rank); a plain ``python launch/train.py`` is a world of one (on a free port)."""
    if "RANK" not in os.environ and not dist.is_initialized():
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    if not dist.is_initialized():
        check_rendezvous_port()
    if not use_cuda():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import deepspeed.ops

    if not use_cuda():
        # DeepSpeed compiles a shared-memory all-reduce for CPU on first use (a C++ build, an
        # inference optimisation); gloo serves training collectives as well, so skip the build.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    timeout = timedelta(minutes=timeout_minutes)
    # DeepSpeed clones the world into new groups (data parallel, ZeRO) with torch's default timeout
    # (30 min, 10 for nccl), not the one given here: make the default ours, or a frozen peer stalls
    # the run for half an hour whenever it stops inside one of those groups' collectives.
    import torch.distributed.distributed_c10d as c10d
    c10d.default_pg_timeout = timeout
    c10d.default_pg_nccl_timeout = timeout
    try:
        with _sigterm_ends_the_process():
            deepspeed.init_distributed(dist_backend="nccl" if use_cuda() else "gloo", timeout=timeout)
    except RuntimeError as e:  # taken between the check above and the bind
        if _is_address_in_use(e):
            raise _port_in_use(int(os.environ.get("MASTER_PORT", 0))) from None
        raise
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if use_cuda():
        torch.cuda.set_device(local_rank)
    else:
        torch.set_num_threads(cpu_threads(world))
    return rank, world, local_rank


@contextmanager
def _sigterm_ends_the_process():
    """SIGTERM at its default (the process ends) while the rendezvous blocks in C++: a Python handler
    would run only when the rendezvous returns, so a rank waiting for a peer that failed (a taken port)
    sat out its launcher's 30-s grace until SIGKILL. There is nothing to save yet, nor a peer to name."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        yield
    finally:
        if previous is not None:  # None: a handler set outside Python, which Python cannot put back
            signal.signal(signal.SIGTERM, previous)


def cpu_threads(world: int) -> int:
    """Threads for a rank on CPU: OMP_NUM_THREADS when something set it (the user, or Ray, which sets it
    to the CPUs a trial's worker was given, so trials side by side do not each take every core), else
    this host's cores shared by its ranks."""
    given = os.environ.get("OMP_NUM_THREADS", "")
    if given.isdigit() and int(given) > 0:
        return int(given)
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", 0))) or \
        min(world, os.cpu_count() or 1)
    return max(1, (os.cpu_count() or 1) // max(1, local_world))


# --- which rank died ----------------------------------------------------------------------------

def write_heartbeat(out: Path, rank: int, step: int, done: bool = False) -> None:
    """out_dir/ranks/rankNNNNN.json: host, pid, step and time, so a survivor can say who died; ``done``
    once the rank has finished its run, so that its exit before a slower peer is not taken for a death."""
    d = out / "ranks"
    d.mkdir(parents=True, exist_ok=True)
    atomic.write_text(d / f"rank{rank:05d}.json", json.dumps(
        {"rank": rank, "host": socket.gethostname(), "pid": os.getpid(), "step": step, "time": time.time(),
         "done": done}))


def _read_heartbeat(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):  # not there yet, or being replaced
        return None


def _finished(out: Path, rank: int) -> bool:
    return bool((_read_heartbeat(out / "ranks" / f"rank{rank:05d}.json") or {}).get("done"))


def watch_local_peers(out: Path, my_rank: int, local_peers: int, interval: float = 0.2) -> None:
    """A daemon thread that names a rank on this host the moment it dies. DeepSpeed's launcher
    notices a dead child within 1 s and then terminates the others, and its own message shows the
    last rank's command whichever rank failed; this thread speaks first (it runs while the main
    thread waits inside a collective, which releases the GIL)."""
    import threading

    here = socket.gethostname()

    def watch() -> None:
        # Heartbeat files are read only until every local peer's pid is known (on a shared file
        # system, N ranks re-reading N files five times a second would load it); then only /proc.
        local: dict[int, int] = {}
        finished: set[int] = set()
        while True:
            time.sleep(interval)
            if len(local) + len(finished) < local_peers:
                for f in (out / "ranks").glob("rank*.json"):
                    hb = _read_heartbeat(f)
                    if hb and hb.get("host") == here and hb.get("rank") not in (my_rank, *finished) and \
                            hb.get("time", 0) >= PROCESS_START:
                        local[int(hb["rank"])] = int(hb["pid"])
            # Only a peer that is gone counts: a stopped one (job control, a debugger) may resume,
            # and if it never does the collective timeout names it.
            ended = [r for r, pid in local.items() if process_state(pid) in ("gone", "exited")]
            for r in [r for r in ended if _finished(out, r)]:  # it finished its run first: not a death
                ended.remove(r)
                local.pop(r)
                finished.add(r)
            if ended:
                dead = describe_dead_peers(str(out), my_rank)
                print(f"rank {my_rank}: a peer died: {dead}. The launcher will stop the other ranks; rerun "
                      f"the same command to resume from the newest complete checkpoint in {out / 'checkpoints'}",
                      file=sys.stderr, flush=True)
                return

    threading.Thread(target=watch, name="distssl-peer-watch", daemon=True).start()


def exit_if_a_peer_died(out_dir: str, rank: int, signum: int) -> None:
    """On one node DeepSpeed's launcher SIGTERMs the survivors as soon as a rank dies, and its own message
    shows the last rank's command whoever failed: a rank so terminated names the dead rank(s) and leaves."""
    dead = describe_dead_peers(out_dir, rank)
    if dead:
        print(f"rank {rank}: terminated by the launcher because a peer died: {dead}. Rerun the same command to "
              f"resume from the newest complete checkpoint in {out_dir}/checkpoints", file=sys.stderr, flush=True)
        os._exit(128 + signum)


def describe_dead_peers(out_dir: str, my_rank: int) -> str:
    """'rank 1 (pid 123 on host h): gone; ...' from the heartbeats, or '' when nothing is known."""
    here = socket.gethostname()
    found = []
    for f in sorted((Path(out_dir) / "ranks").glob("rank*.json")):
        hb = _read_heartbeat(f)
        if not hb or hb.get("rank") == my_rank or hb.get("time", 0) < PROCESS_START or hb.get("done"):
            continue
        where = f"rank {hb['rank']} (pid {hb['pid']} on {hb['host']})"
        if hb.get("host") == here:
            state = process_state(int(hb["pid"]))
            if state:
                found.append(f"{where} is {state}, last at step {hb['step']}")
        else:
            found.append(f"{where} last reported step {hb['step']} {time.time() - hb['time']:.0f} s ago")
    return "; ".join(found)
