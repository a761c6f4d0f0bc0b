"""The command lines: distssl-train, distssl-tune, distssl-shards, distssl-export, distssl-inspect,
distssl-supervise, distssl-predict and distssl-selftrain (console entry points), also run as
launch/train.py, launch/tune.py, tools/make_shards.py, tools/export_model.py, tools/inspect_shards.py,
launch/supervise.py, launch/predict.py and launch/selftrain.py."""

import atexit
import gc

_registered = False


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
