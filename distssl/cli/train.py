#!/usr/bin/env python
"""Train a timm backbone semi-supervised on DeepSpeed ZeRO, from shard sets: FixMatch (with distribution
alignment), FlexMatch, FreeMatch, SoftMatch, UDA, Mean Teacher, Pi-Model, Temporal Ensembling, VAT,
MixMatch or ReMixMatch (ssl.algorithm).

  deepspeed --num_gpus N launch/train.py --config configs/demo.yaml [key=value ...]
  python launch/train.py --config configs/demo.yaml [key=value ...]      # one process

Overrides use dotted keys of the config tree, e.g. ssl.tau=0.9 train.steps=500
deepspeed.zero_stage=3 data.unlabeled=s3://bucket/shards/unlabeled. `--keys` lists every key with its
default and meaning; `--print-config` prints the resolved config and exits.

Rerunning with the same run.out_dir resumes from its latest complete checkpoint; a larger train.steps
continues it. Ctrl-C (or a scheduler's SIGTERM/SIGUSR1) saves a checkpoint at the next step boundary
and exits (130 for Ctrl-C, 75 for a preemption); a second Ctrl-C leaves at once. Exit 2: a mistake in
the config or the data named in one line; 3: too many unusable samples; 4: a peer rank died.
"""
import argparse
import logging
import os
import sys

from distssl.cli import command
from distssl.config import Config, check_paths, load_config, redacted_dict
from distssl.config.coerce import describe_keys
from distssl.config.tree import unset_data_keys
from distssl.data.streams import DataError
from distssl.distributed.peers import describe_dead_peers, exit_if_a_peer_died, is_peer_failure
from distssl.distributed.preempt import Preempted
from distssl.notices import silence_known_notices
from distssl.shards import demo
from distssl.train.run import run


def print_keys(prefix: str = "") -> int:
    """Every config key with its type, default and meaning (from the schema's own comments); 2 when no key
    starts with ``prefix``."""
    import dataclasses
    import json

    rows = [r for r in describe_keys(Config) if r[0].startswith(prefix)]
    if not rows:
        sections = [f.name for f in dataclasses.fields(Config)]
        print(f"distssl-train --keys {prefix}: no key starts with {prefix!r}; the sections are "
              f"{', '.join(sections)} (e.g. --keys ssl.)", file=sys.stderr)
        return 2
    for key, type_name, default, meaning in rows:
        if type_name == "section":
            print(f"\n{key}: {meaning}")
            continue
        print(f"{key} = {json.dumps(default)}  ({type_name})" + (f"\n    {meaning}" if meaning else ""))
    return 0


def print_config(cfg) -> None:
    """The resolved config as YAML; a data key still to be filled in says so on its line."""
    import yaml

    unset = {key.split(".", 1)[1] for key in unset_data_keys(cfg)}
    section = None
    for line in yaml.safe_dump(redacted_dict(cfg), sort_keys=False).splitlines():
        if not line.startswith(" "):
            section = line.rstrip(":")
        name = line.strip().split(":", 1)[0]
        if section == "data" and line.startswith("  ") and not line.startswith("   ") and name in unset:
            line += "  # NOT SET: a shard set (folder or URL with index.json) before training"
        print(line)


@command
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="a YAML path, or a recipe shipped in the package by name: demo, starter, cifar10, "
                                    "imagenet, vit_finetune (configs/NAME.yaml in a checkout)")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config (recipe + overrides + defaults) as YAML and exit")
    p.add_argument("--keys", nargs="?", const="", metavar="PREFIX",
                   help="list every config key (or those starting with PREFIX, e.g. ssl.) with its default and "
                        "meaning, and exit")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. ssl.tau=0.9")
    args = p.parse_args(argv)
    if args.keys is not None:
        return print_keys(args.keys)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    try:
        return _train(args)
    except KeyboardInterrupt:  # before the step loop's handler is installed (start-up, shard build, teardown)
        print("interrupted before training began its steps: nothing to save; rerun the same command to start "
              "again (a demo build that was cut short is finished, not redone)", file=sys.stderr, flush=True)
        return 130


def _train(args) -> int:

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("distssl").setLevel(logging.INFO)  # ours: what was loaded, from where
    cfg = load_config(args.config, args.overrides, require_data=not args.print_config)
    if args.print_config:
        print_config(cfg)
        return 0

    demo.prepare(cfg.data, progress=os.environ.get("RANK", "0") == "0")
    check_paths(cfg)

    code, result = train_with_exit_codes(cfg)
    if code == 0 and os.environ.get("RANK", "0") == "0" and not result.get("already_finished"):
        print(f"done: step {cfg.train.steps}, eval top-1 {100 * result['top1']:.2f}% "
              f"(EMA weights), outputs in {cfg.run.out_dir}")
    return code


def train_with_exit_codes(cfg) -> tuple[int, dict]:
    """Train ``cfg`` (or resume it) as the command does: (exit code, final eval). A user's mistake is one
    line and 2, too many unusable samples 3, a dead peer 4 (named from the heartbeats); a preemption
    leaves the process at once with 75, its checkpoint complete on every rank (a UserError is raised to the
    command, which says its line: distssl.cli.command)."""

    silence_known_notices()
    _report_dead_peers_on_sigterm(cfg.run.out_dir)

    rank = os.environ.get("RANK", "0")
    try:
        return 0, run(cfg)
    except Preempted as e:  # rank 0 has said it (the trainer's last line): say nothing twice
        # the checkpoint is complete on every rank: leave now, inside the grace period, without
        # waiting on loader workers or the process group's teardown
        sys.stdout.flush()
        os._exit(e.exit_code)
    except DataError as e:
        msg = str(e).strip()
        if "Original Traceback" in msg:  # raised in a loader worker: the message is its last line
            msg = msg.splitlines()[-1].split("DataError: ", 1)[-1]
        print(f"data error: {msg}", file=sys.stderr)
        return 3, {}
    except RuntimeError as e:
        if not is_peer_failure(e):
            raise
        first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
        dead = describe_dead_peers(cfg.run.out_dir, int(rank) if rank.isdigit() else -1)
        print(f"rank {rank}: a collective failed, so a peer rank died or stopped answering "
              f"(deepspeed.timeout_minutes={cfg.deepspeed.timeout_minutes}): "
              f"{dead or 'the heartbeats in run.out_dir/ranks/ do not say which'}. "
              f"Rerun the same command to resume from the newest complete checkpoint in "
              f"{cfg.run.out_dir}/checkpoints ({first[:200]})", file=sys.stderr)
        return 4, {}


def _report_dead_peers_on_sigterm(out_dir: str) -> None:
    """Until the step loop installs its own handler (distssl.distributed.preempt), a SIGTERM from the launcher because
    a peer died names that peer; any other SIGTERM ends the process as by default (during the rendezvous
    itself SIGTERM is at its default: distssl.distributed.peers.init_distributed)."""
    import signal

    def handler(signum, frame):
        rank = os.environ.get("RANK", "?")
        exit_if_a_peer_died(out_dir, int(rank) if rank.isdigit() else -1, signum)
        os._exit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


if __name__ == "__main__":
    sys.exit(main())
