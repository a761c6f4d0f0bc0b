#!/usr/bin/env python
"""Train a timm backbone with FixMatch + distribution alignment on DeepSpeed ZeRO.

  deepspeed --num_gpus N launch/train.py --config configs/demo.yaml [key=value ...]
  python launch/train.py --config configs/demo.yaml [key=value ...]      # one process

Overrides use dotted keys of the config tree, e.g. ssl.tau=0.9 train.steps=500
deepspeed.zero_stage=3 data.unlabeled=s3://bucket/shards/unlabeled. Rerunning with the same
run.out_dir resumes from its latest complete checkpoint; a larger train.steps continues it.
"""
import argparse
import logging
import os
import sys


def _is_peer_failure(e: BaseException) -> bool:
    """A collective that failed because another rank is gone (gloo/nccl errors, timeouts)."""
    import torch.distributed as dist

    text = str(e)
    return isinstance(e, getattr(dist, "DistError", ())) or any(
        k in text for k in ("Connection closed by peer", "Connection reset by peer", "Timed out", "timed out",
                            "NCCL", "gloo", "ProcessGroup"))


def _report_dead_peers_on_sigterm(out_dir: str) -> None:
    """On one node DeepSpeed's launcher SIGTERMs the survivors as soon as a rank dies, and its own
    message shows the last rank's command whoever failed: name the dead rank(s) here instead."""
    import signal

    def handler(signum, frame):
        from distssl.peers import describe_dead_peers

        rank = os.environ.get("RANK", "?")
        dead = describe_dead_peers(out_dir, int(rank) if rank.isdigit() else -1)
        if dead:
            print(f"rank {rank}: terminated by the launcher because a peer died: {dead}. Rerun the same command "
                  f"to resume from the newest complete checkpoint in {out_dir}/checkpoints", file=sys.stderr,
                  flush=True)
        os._exit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML config (configs/demo.yaml, configs/cifar10.yaml, ...)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. ssl.tau=0.9")
    args = p.parse_args(argv)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))

    from distssl.config import ConfigError, check_paths, load_config

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("distssl").setLevel(logging.INFO)  # ours: what was loaded, from where
    try:
        cfg = load_config(args.config, args.overrides)
        from distssl.demo import ensure_demo_data, uses_demo_data
        if uses_demo_data(cfg.data):
            ensure_demo_data(cfg.data.demo_root, progress=os.environ.get("RANK", "0") == "0")
        check_paths(cfg)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2

    from distssl.notices import silence_known_notices

    silence_known_notices()
    _report_dead_peers_on_sigterm(cfg.run.out_dir)
    from distssl.engine import DataError, run
    from distssl.preempt import PREEMPTED_EXIT, Preempted
    try:
        result = run(cfg)
    except Preempted as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"preempted: {e}", file=sys.stderr, flush=True)
        # the checkpoint is complete on every rank: leave now, inside the grace period, without
        # waiting on loader workers or the process group's teardown
        sys.stdout.flush()
        os._exit(PREEMPTED_EXIT)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except DataError as e:
        msg = str(e).strip()
        if "Original Traceback" in msg:  # raised in a loader worker: the message is its last line
            msg = msg.splitlines()[-1].split("DataError: ", 1)[-1]
        print(f"data error: {msg}", file=sys.stderr)
        return 3
    except RuntimeError as e:
        if not _is_peer_failure(e):
            raise
        from distssl.peers import describe_dead_peers

        rank = os.environ.get("RANK", "?")
        first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
        dead = describe_dead_peers(cfg.run.out_dir, int(rank) if rank.isdigit() else -1)
        print(f"rank {rank}: a collective failed, so a peer rank died or stopped answering "
              f"(deepspeed.timeout_minutes={cfg.deepspeed.timeout_minutes}): "
              f"{dead or 'the heartbeats in run.out_dir/ranks/ do not say which'}. "
              f"Rerun the same command to resume from the newest complete checkpoint in "
              f"{cfg.run.out_dir}/checkpoints ({first[:200]})", file=sys.stderr)
        return 4
    if os.environ.get("RANK", "0") == "0":
        print(f"done: step {cfg.train.steps}, eval top-1 {100 * result['top1']:.2f}% "
              f"(EMA weights), outputs in {cfg.run.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
