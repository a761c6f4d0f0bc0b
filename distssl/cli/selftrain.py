#!/usr/bin/env python
"""Self-training rounds (Noisy Student): train, label the unlabeled set, train a noised student on the
human labels plus the confident pseudo-labels, and again with the student as the teacher.

  distssl-selftrain --rounds 3 --config configs/demo.yaml run.out_dir=runs/st [key=value ...]
  deepspeed --num_gpus 8 $(which distssl-selftrain) --rounds 3 --config my.yaml run.out_dir=runs/st

Round 0 is the run the config describes, in run.out_dir/round-0. Each later round K:
  1. predicts data.unlabeled with round K-1's exported EMA weights and calibrated confidences
     (run.out_dir/round-K/teacher_predictions, as distssl-predict writes it);
  2. keeps the predictions at confidence >= selftrain.min_confidence as a labeled shard set
     (run.out_dir/round-K/pseudo_labeled);
  3. trains a student in run.out_dir/round-K on data.labeled + that set, with the SSL loss
     (selftrain.ssl=true) or without it (false, the paper's), noised: the strong view on its labeled
     images, dropout (selftrain.drop_rate) and stochastic depth (selftrain.drop_path_rate), and the
     model selftrain.student_model (null: the teacher's);
  4. hands over: the student is the next round's teacher.
run.out_dir/selftrain.json keeps each finished round's top-1. Every round is a resumable run folder:
killing the command and rerunning it continues the round in progress; finished rounds are passed over
and nothing of theirs is rewritten. `distssl-train --keys selftrain.` lists the section's keys.
Exit codes as distssl-train's (2 config or data mistake, 3 bad data, 4 dead peer, 75 preempted).
"""
import argparse
import logging
import os
import sys

from distssl.cli import skip_the_final_collections


def main(argv=None) -> int:
    skip_the_final_collections()
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
    import torch

    from distssl.cli.predict import report
    from distssl.cli.train import train_with_exit_codes
    from distssl.config import check_paths, load_config
    from distssl.distributed.collectives import barrier, end_group
    from distssl.distributed.peers import init_distributed, use_cuda
    from distssl.errors import UserError
    from distssl.predict import selftrain
    from distssl.predict.job import PredictJob, run_job
    from distssl.shards import demo

    is_rank0 = os.environ.get("RANK", "0") == "0"
    try:
        base = load_config(a.config, a.overrides)
        demo.prepare(base.data, progress=is_rank0)
        check_paths(base)
    except UserError as e:
        print(f"{e.label}: {e}", file=sys.stderr)
        return 2
    root, rounds = base.run.out_dir, base.selftrain.rounds
    rank, world, local_rank = init_distributed(base.deepspeed.timeout_minutes)  # one group for every round
    device = torch.device(f"cuda:{local_rank}") if use_cuda() else torch.device("cpu")
    record = selftrain.read_record(root)
    for k in range(rounds):
        cfg = selftrain.round_config(base, k, root)
        pseudo = None
        if k > 0:
            teacher = selftrain.round_dir(root, k - 1)
            job = PredictJob(teacher, base.data.unlabeled, str(os.path.join(cfg.run.out_dir, selftrain.PREDICTIONS)),
                             batch_size=a.batch_size, to_shards=os.path.join(cfg.run.out_dir, selftrain.PSEUDO),
                             min_confidence=base.selftrain.min_confidence, progress=is_rank0)
            try:
                summary = run_job(job, rank, world, device)
            except (UserError, FileNotFoundError, ValueError) as e:
                print(f"round {k}: predicting with the teacher {teacher}: {e}", file=sys.stderr)
                return 2
            if rank == 0:
                print(f"round {k}: teacher {teacher}")
                report(summary, job, world)
                pseudo = summary["pseudo_index"]
            barrier()  # the pseudo-labeled set's index.json is written before anyone trains
        if rank == 0:
            print(f"round {k}: training {cfg.model.name} in {cfg.run.out_dir}", flush=True)
        code, result = train_with_exit_codes(cfg)
        if code:
            return code
        barrier()  # rank 0 exports the round's model after the others are done training
        if rank == 0:
            entry = selftrain.round_entry(cfg, k, result, pseudo)
            record = [r for r in record if r["round"] != k] + [entry]
            selftrain.write_record(root, sorted(record, key=lambda r: r["round"]))
            print(f"round {k}: eval top-1 {100 * result['top1']:.2f}%", flush=True)
    if rank == 0:
        print("self-training: " + "; ".join(f"round {r['round']} {100 * r['top1']:.2f}%" for r in record
                                            if r["round"] < rounds) + f" ({root}/{selftrain.RECORD})")
    end_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
