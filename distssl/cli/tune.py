#!/usr/bin/env python
"""Ray Tune sweep over training keys (FixMatch's tau, lambda_u, mu, or any other), ASHA by default.

  python launch/tune.py --config configs/tune/demo.yaml [key=value ...]

`tune.*` overrides set the sweep (tune.num_samples=8, tune.workers_per_trial=2, tune.address=...);
every other key=value overrides the base training config of all trials (train.steps=300,
run.out_dir=runs/my-sweep). Outputs in run.out_dir: results.csv (one row per trial, sorted by the
metric), best_config.yaml (a complete config for launch/train.py), sweep.png, and Ray's state under
ray/ so that rerunning the same command after a kill resumes the sweep without redoing finished trials.
On a Ray cluster: `ray start --head` on one node, `ray start --address=HEAD:6379` on the others,
then run this with tune.address=auto.
"""
import argparse
import json
import logging
import sys

from distssl.cli import command
from distssl.config import check_paths
from distssl.shards import demo
from distssl.train import preflight
from distssl.tune import load_sweep, run_sweep


@command
def main(argv=None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:
        print("tune: interrupted: rerun the same command to resume the sweep (finished trials are kept, the others "
              "restart from their last checkpoint)", file=sys.stderr)
        return 130


def _main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="tune YAML, or a shipped sweep by name (demo = "
                                                   "configs/tune/demo.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    sweep = load_sweep(a.config, a.overrides)
    demo.prepare(sweep.base.data, progress=True)
    check_paths(sweep.base)
    preflight.check(sweep.base)  # the base config's mistakes, before Ray starts
    summary = run_sweep(sweep)
    print(json.dumps(summary, indent=1, default=str))
    return 0 if "best_config" in summary else 1


if __name__ == "__main__":
    sys.exit(main())
