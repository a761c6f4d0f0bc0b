#!/usr/bin/env python
"""Run a training command so that a scheduler's signal to this one process saves the run, and so that
this process exits only after every process the command started has (a container's command, PID 1).

  distssl-supervise deepspeed --num_gpus 8 launch/train.py --config configs/imagenet.yaml [key=value ...]
  distssl-supervise torchrun --nproc-per-node 8 launch/train.py ...

Why: Kubernetes stops a pod with SIGTERM to the container's first process, and when that process exits,
every other process in the container is killed at once. DeepSpeed's `deepspeed` runner exits at once on
SIGTERM and passes nothing on, so as the container's command it takes the ranks down before they save.
This command passes SIGTERM, SIGUSR1, SIGINT and SIGHUP on to the command it runs, then waits: it is the
subreaper of everything below it (an orphaned launcher or rank is re-parented to it, not to init), so it
reaps them all and exits last. The ranks save at the next step boundary (a rank whose launcher is gone
takes that as the signal) and the run exits 75 ("preempted: rerun the same command"), which this
command returns. As PID 1 it also reaps zombies. Give the pod a terminationGracePeriodSeconds longer
than one step plus one checkpoint.
"""
import argparse
import os
import signal
import subprocess
import sys

from distssl.cli import command
from distssl.distributed.procs import PR_SET_CHILD_SUBREAPER, prctl

FORWARDED = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT, signal.SIGHUP)


@command
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", nargs=argparse.REMAINDER, help="the command to run (a launcher and its arguments)")
    a = p.parse_args(argv)
    if not a.command:
        p.error("give the command to run, e.g. distssl-supervise deepspeed --num_gpus 2 launch/train.py "
                "--config configs/demo.yaml")
    if not prctl(PR_SET_CHILD_SUBREAPER, 1):  # orphans below are re-parented here, to be waited for
        print("distssl-supervise: this system has no child subreapers (Linux >= 3.4): the signal is passed on, "
              "but orphaned ranks are not waited for", file=sys.stderr)
    try:
        child = subprocess.Popen(a.command)
    except FileNotFoundError:
        print(f"distssl-supervise: {a.command[0]}: command not found", file=sys.stderr)
        return 127
    def forward(signum, frame):
        if child.returncode is None:  # set by reap_all once the child is reaped
            try:
                os.kill(child.pid, signum)
            except ProcessLookupError:
                pass

    for s in FORWARDED:
        signal.signal(s, forward)
    return reap_all(child)


def reap_all(child: subprocess.Popen) -> int:
    """Wait for the child and every process re-parented here; the run's exit status: the child's, or,
    when the child died of a signal (DeepSpeed's runner on SIGTERM), that of the first adopted process
    that failed (its per-node launcher, which exits with its ranks' status, e.g. 75 for a preemption)."""
    child_code, adopted = None, []
    while True:
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:  # no child left, own or adopted
            break
        code = os.waitstatus_to_exitcode(status)
        if pid == child.pid:
            child_code = child.returncode = code  # reaped here: Popen must not wait for it again
        elif code > 0:  # not the loader workers SIGKILLed as their rank left (a negative code)
            adopted.append(code)
    if child_code is None:
        return 1
    if child_code < 0:
        return adopted[0] if adopted else 128 - child_code
    return child_code


if __name__ == "__main__":
    sys.exit(main())
