"""The command lines: distssl-train, distssl-tune, distssl-shards, distssl-export, distssl-inspect,
distssl-supervise, distssl-predict and distssl-selftrain (console entry points), also run as
launch/train.py, launch/tune.py, tools/make_shards.py, tools/export_model.py, tools/inspect_shards.py,
launch/supervise.py, launch/predict.py and launch/selftrain.py."""

import atexit
import functools
import gc
import os
import sys
import time

from distssl.errors import UserError

_registered = False
RANK0_GRACE_S = 20.0  # longest a silent rank waits for rank 0's line before exiting itself


def skip_the_final_collections() -> None:
    """At exit, move every object to the collector's permanent generation before Python tears its modules
    down: finalising torch, DeepSpeed and timm otherwise runs full collections over their whole heap for
    ~2 s per process (each rank, each run; measured in docs/benchmarks.md). Objects are still freed by
    reference counting; only cyclic garbage left at exit is not collected, and the process is ending.
    Registered when a command starts (not at import: a test process calling main() keeps its collector)."""
    global _registered
    if not _registered:
        atexit.register(gc.freeze)
        _registered = True


def command(main):
    """A console script's ``main``: its final collections skipped (above), a user's mistake (UserError, raised
    anywhere below) its one line and exit 2 (:func:`refuse`), and a closed pipe (``| head``) ends it quietly, as a
    Unix command does, instead of a BrokenPipeError traceback (exit 141, 128 + SIGPIPE)."""
    @functools.wraps(main)
    def run(argv=None) -> int:
        skip_the_final_collections()
        try:
            return main(argv)
        except UserError as e:  # the one place a user's mistake becomes its line and exit 2
            return refuse(e)
        except BrokenPipeError:
            # the interpreter flushes stdout again at exit: point it at /dev/null so that flush is silent too
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 141
    return run


def is_rank0() -> bool:
    """This process prints the run's lines: rank 0 of a launch (RANK as the launchers set it), or the only one."""
    return os.environ.get("RANK", "0") == "0"


def refuse(e, exit_code: int = 2) -> int:
    """A mistake the user can fix (distssl.errors.UserError): its one line, ``label: message``, printed by rank 0
    alone (every rank finds the same mistake), and the exit code (2)."""
    if is_rank0():
        print(f"{e.label}: {e}", file=sys.stderr, flush=True)
    elif int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # a launcher stops every rank when the first one exits: the silent ranks wait for rank 0 to have said
        # the line and exited (the launcher then ends them), so the user never gets the exit code alone
        time.sleep(RANK0_GRACE_S)
    return exit_code
