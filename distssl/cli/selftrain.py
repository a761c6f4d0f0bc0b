#!/usr/bin/env python
"""Self-training rounds (Noisy Student): train, label the unlabeled set, train a noised student on the
human labels plus the confident pseudo-labels, and again with the student as the teacher.

  distssl-selftrain --rounds 3 --config configs/demo.yaml run.out_dir=runs/st [key=value ...]
  deepspeed --num_gpus 8 $(which distssl-selftrain) --rounds 3 --config my.yaml run.out_dir=runs/st

Round 0 is the run the config describes, in run.out_dir/round-0. Each later round K:
  1. its teachers predict data.unlabeled with their calibrated confidences: round K-1's export, every earlier
     round's too with selftrain.ensemble=all, and the models in selftrain.teachers (their probabilities
     averaged; run.out_dir/round-K/teacher_predictions, as distssl-predict writes it);
  2. the predictions at confidence >= selftrain.min_confidence, balanced per class (each class's most
     confident up to selftrain.per_class, a rarer class's duplicated up to it), become a labeled shard set
     (run.out_dir/round-K/pseudo_labeled), hard labels or soft (selftrain.targets);
  3. a student trains in run.out_dir/round-K on data.labeled + that set for selftrain.epochs passes over it
     (in batches of selftrain.batch_size), with the SSL loss (selftrain.ssl=true) or without it (false, the
     paper's), noised: the strong view on its labeled images, dropout (selftrain.drop_rate) and stochastic
     depth (selftrain.drop_path_rate), and the model selftrain.student_model (null: the teacher's);
  4. hands over: the student is the next round's teacher. A student below its teacher is said in a warning.
run.out_dir/selftrain.json keeps each finished round's top-1 and names the best round, whose export is
copied to run.out_dir/model.safetensors + model.json: the command's model, never worse than round 0's.
Every round is a resumable run folder: killing the command and rerunning it continues the round in
progress; finished rounds are passed over and nothing of theirs is rewritten. `distssl-train --keys
selftrain.` lists the section's keys.
Exit codes as distssl-train's (2 config or data mistake, 3 bad data, 4 dead peer, 75 preempted).
"""
import argparse
import logging
import os
import sys

from distssl.cli import command
from distssl.cli.train import train_with_exit_codes
from distssl.selftrain.rounds import run_command


@command
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="a YAML path or a shipped recipe's name (as distssl-train's)")
    p.add_argument("--rounds", type=int, help="rounds in all, round 0 included (selftrain.rounds; default 2)")
    p.add_argument("--batch-size", type=int, default=256, help="prediction batch per rank (default 256)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. selftrain.ssl=true")
    a = p.parse_args(argv)
    if a.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(a.local_rank))
    if a.rounds is not None:
        a.overrides = [*a.overrides, f"selftrain.rounds={a.rounds}"]
    if a.batch_size < 1:
        p.error("--batch-size must be at least 1")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("distssl").setLevel(logging.INFO)
    try:
        return _rounds(a)
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to continue the round in progress", file=sys.stderr, flush=True)
        return 130


def _rounds(a) -> int:

    return run_command(a.config, a.overrides, a.batch_size, train_with_exit_codes)


if __name__ == "__main__":
    sys.exit(main())
