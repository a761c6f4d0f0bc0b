"""Save on the scheduler's signal.

SLURM (``--signal=USR1@120``) and Kubernetes (SIGTERM, then SIGKILL after
``terminationGracePeriodSeconds``) preempt a job with a signal and a grace period. A rank's handler
only notes the signal: the training loop folds the note into the all-reduce it already makes every
step, so every rank learns it at the same step boundary, all write one complete checkpoint together,
and the run exits with :data:`PREEMPTED_EXIT` ("preempted: rerun the same command to resume").

Loader worker processes ignore these signals (:func:`ignore_in_worker`): SLURM signals every process
of the step and DeepSpeed's launcher terminates each rank's whole process tree, and a dying loader
worker would take its rank down before it saved. They exit with their rank.

A signal often reaches only the command the user started (a container's command, SLURM's ``scancel``
without ``B:``): DeepSpeed's ``deepspeed`` runner then exits at once and passes nothing on, leaving its
per-node launcher and the ranks orphaned. So each rank also watches its launcher chain
(:func:`launcher_chain`, :meth:`PreemptWatch.watch_launchers`): when a launcher in it is gone or
re-parented, the rank takes that as the signal it did not get, and the run saves and exits as above.

A SIGTERM that comes because a peer rank died (DeepSpeed's launcher stops the survivors that way) is
not a preemption: the handler names the dead peer and exits at once, as before.

Ctrl-C (SIGINT, whatever run.preempt_signals says) is handled the same way: the first one saves at the
next step boundary and the run exits :data:`INTERRUPTED_EXIT` with one line; a second one leaves at once
(the newest complete checkpoint is still there: checkpoints appear only complete).
"""
from __future__ import annotations

import atexit
import logging
import os
import re
import signal
import sys
import threading
import time
from pathlib import Path
from typing import NamedTuple, Optional

from distssl.distributed.peers import exit_if_a_peer_died
from distssl.distributed.procs import PR_SET_PDEATHSIG, parent_of, prctl

log = logging.getLogger(__name__)
PREEMPTED_EXIT = 75  # sysexits' EX_TEMPFAIL: a temporary failure, the same command may be retried
INTERRUPTED_EXIT = 130  # 128 + SIGINT, what a shell reports for a job stopped by Ctrl-C


class Preempted(Exception):
    """Raised after the preemption checkpoint is complete."""

    def __init__(self, step: int, checkpoint: Path, signame: str):
        what = "interrupted (Ctrl-C)" if signame == "SIGINT" else f"preempted by {signame}"
        super().__init__(f"{what} at step {step}: saved {checkpoint}. Rerun the same command to "
                         f"resume from it (any number of ranks)")
        self.step, self.checkpoint, self.signame = step, checkpoint, signame

    @property
    def exit_code(self) -> int:
        return INTERRUPTED_EXIT if self.signame == "SIGINT" else PREEMPTED_EXIT


def signal_numbers(names: list[str]) -> list[int]:
    return [int(getattr(signal, n)) for n in names]


_ignored: tuple[int, ...] = ()


def _reap_loader_workers() -> None:
    """At exit, multiprocessing stops daemonic children (loader workers) with SIGTERM and waits for
    them: ours ignore it (above), so they are killed here first; they hold nothing to save."""
    import multiprocessing

    # torch's SIGCHLD handler would report each kill as a failed loader worker
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for child in multiprocessing.active_children():
        if child.daemon and child.pid:
            try:
                os.kill(child.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def ignore_in_worker(_worker_id: int = 0) -> None:
    """DataLoader ``worker_init_fn``: the preemption signals are the rank's to handle, and the worker
    dies with its rank however the rank ends (an os._exit skips the reaping at exit; torch's own
    watchdog notices an orphaned worker only seconds later, while it still holds the rank's sockets,
    the rendezvous port among them)."""
    prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL))
    for s in _ignored:
        signal.signal(s, signal.SIG_IGN)


class Launcher(NamedTuple):
    pid: int
    name: str


# what launches ranks: DeepSpeed's runner (bin/deepspeed, deepspeed.launcher.runner) and per-node
# launcher (deepspeed.launcher.launch), torchrun (bin/torchrun, torch.distributed.run / .launch)
_LAUNCHERS = re.compile(r"(^|/)(deepspeed|torchrun)$|^deepspeed\.launcher\.(runner|launch)$|"
                        r"^torch\.distributed\.(run|launch)$")


def _launcher_name(pid: int) -> str:
    """'deepspeed', 'deepspeed.launcher.launch', 'torchrun', ... when the process is a launcher, else ''."""
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return ""
    for i, arg in enumerate(args[:4]):  # the interpreter, maybe -u, then the script or -m module
        name = args[i + 1] if arg == "-m" and i + 1 < len(args) else arg
        if _LAUNCHERS.search(name):
            return name.rsplit("/", 1)[-1]
    return ""


def launcher_chain(pid: int) -> list[Launcher]:
    """The launchers above a rank, nearest first: its parents while they are launchers (the per-node
    launcher, then the runner). Empty when the rank was not started by a launcher (one process, a Ray
    Train worker)."""
    chain, parent = [], parent_of(pid)
    while parent and parent > 1:
        name = _launcher_name(parent)
        grandparent = parent_of(parent)
        if not name or grandparent is None:
            break
        chain.append(Launcher(parent, name))
        parent = grandparent
    return chain


def lost_launcher(pid: int, chain: list[Launcher]) -> Optional[Launcher]:
    """The launcher of ``chain`` that is gone: whose child (the rank, or the launcher below it) has
    another parent now. The topmost launcher's own parent is not watched: a shell that started
    ``nohup deepspeed ... &`` and exited re-parents the runner, and the run goes on."""
    below = [pid, *(c.pid for c in chain[:-1])]
    return next((c for child, c in zip(below, chain) if parent_of(child) != c.pid), None)


class PreemptWatch:
    """Notes a preemption signal; :attr:`requested` is read at every step boundary."""

    def __init__(self, names: list[str], out_dir: str, rank: int):
        global _ignored
        self.out_dir, self.rank = out_dir, rank
        self.signum: Optional[int] = None
        self.saved = False
        self.launcher_gone = ""  # the launcher whose loss stood for the signal, when one did
        self.numbers = signal_numbers(names)
        if threading.current_thread() is not threading.main_thread():
            return  # e.g. a Ray Tune trial's training thread: Ray owns the signals there
        handled = [*self.numbers, *([signal.SIGINT] if signal.SIGINT not in self.numbers else [])]
        _ignored = tuple(handled)
        for s in handled:
            signal.signal(s, self._handler)
        atexit.register(_reap_loader_workers)

        self.watch_launchers()

    def watch_launchers(self, interval: float = 0.25) -> None:
        """A daemon thread that requests the save when a launcher above this rank goes (see the module)."""
        chain = launcher_chain(os.getpid())
        if not chain:
            return

        def watch() -> None:
            while self.signum is None:
                time.sleep(interval)
                gone = lost_launcher(os.getpid(), chain)
                if gone is not None and self.signum is None:
                    print(f"rank {self.rank}: its launcher {gone.name} (pid {gone.pid}) is gone without passing a "
                          f"signal on: saving a checkpoint at the next step boundary, then exiting "
                          f"({PREEMPTED_EXIT})", file=sys.stderr, flush=True)
                    self.signum = int(signal.SIGTERM)
                    self.launcher_gone = gone.name
                    return

        threading.Thread(target=watch, name="distssl-launcher-watch", daemon=True).start()

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def signame(self) -> str:
        if self.launcher_gone:
            return f"the loss of its launcher ({self.launcher_gone})"
        return signal.Signals(self.signum).name if self.signum else ""

    def _handler(self, signum, frame) -> None:
        if self.saved:  # the checkpoint is written: the rest is exiting
            os._exit(INTERRUPTED_EXIT if signum == signal.SIGINT else PREEMPTED_EXIT)
        if signum == signal.SIGINT and self.signum == signal.SIGINT:  # Ctrl-C twice: leave now
            print(f"rank {self.rank}: interrupted again: leaving without saving (the newest complete checkpoint "
                  f"in {self.out_dir}/checkpoints is kept)", file=sys.stderr, flush=True)
            os._exit(INTERRUPTED_EXIT)
        if signum == signal.SIGTERM:  # from the launcher because a peer died? then not a preemption
            exit_if_a_peer_died(self.out_dir, self.rank, signum)
        if self.signum is None:
            if signum == signal.SIGINT:
                print(f"rank {self.rank}: Ctrl-C: saving a checkpoint at the next step boundary, then exiting "
                      f"(Ctrl-C again to leave now)", file=sys.stderr, flush=True)
            else:
                print(f"rank {self.rank}: {signal.Signals(signum).name} received: saving a checkpoint at the next "
                      f"step boundary, then exiting ({PREEMPTED_EXIT})", file=sys.stderr, flush=True)
            self.signum = signum
