"""The command lines: distssl-train, distssl-tune, distssl-shards, distssl-export, distssl-inspect and
distssl-supervise (console entry points), also run as launch/train.py, launch/tune.py, tools/make_shards.py,
tools/export_model.py, tools/inspect_shards.py and launch/supervise.py."""
