"""Save on the scheduler's signal.

SLURM (``--signal=USR1@120``) and Kubernetes (SIGTERM, then SIGKILL after
``terminationGracePeriodSeconds``) preempt a job with a signal and a grace period. A rank's handler
only notes the signal: the training loop folds the note into the all-reduce it already makes every
step, so every rank learns it at the same step boundary, all write one complete checkpoint together,
and the run exits with :data:`PREEMPTED_EXIT` ("preempted: rerun the same command to resume").

Loader worker processes ignore these signals (:func:`ignore_in_worker`): SLURM signals every process
of the step and DeepSpeed's launcher terminates each rank's whole process tree, and a dying loader
worker would take its rank down before it saved. They exit with their rank.

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
import signal
import sys
import threading
from pathlib import Path
from typing import Optional

from distssl.peers import exit_if_a_peer_died

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
    """DataLoader ``worker_init_fn``: the preemption signals are the rank's to handle."""
    for s in _ignored:
        signal.signal(s, signal.SIG_IGN)


class PreemptWatch:
    """Notes a preemption signal; :attr:`requested` is read at every step boundary."""

    def __init__(self, names: list[str], out_dir: str, rank: int):
        global _ignored
        self.out_dir, self.rank = out_dir, rank
        self.signum: Optional[int] = None
        self.saved = False
        self.numbers = signal_numbers(names)
        if threading.current_thread() is not threading.main_thread():
            return  # e.g. a Ray Tune trial's training thread: Ray owns the signals there
        handled = [*self.numbers, *([signal.SIGINT] if signal.SIGINT not in self.numbers else [])]
        _ignored = tuple(handled)
        for s in handled:
            signal.signal(s, self._handler)
        atexit.register(_reap_loader_workers)

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def signame(self) -> str:
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
