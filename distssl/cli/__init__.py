"""The command lines: distssl-train, distssl-tune, distssl-shards, distssl-export, distssl-inspect,
distssl-supervise, distssl-predict and distssl-selftrain (console entry points), also run as
launch/train.py, launch/tune.py, tools/make_shards.py, tools/export_model.py, tools/inspect_shards.py,
launch/supervise.py, launch/predict.py and launch/selftrain.py."""
