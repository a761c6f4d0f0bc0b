#!/usr/bin/env python
"""Predict a trained model's labels for every image of a data spec: Parquet parts + summary.json.

  distssl-predict RUN_OR_MODEL --data SPEC --out OUT [--batch-size 256] [--topk 5] [--part-size 1000]
  deepspeed --num_gpus 8 $(which distssl-predict) RUN --data s3://shards/bucket/unlabeled --out s3://preds/r1
  torchrun --nproc_per_node 8 launch/predict.py RUN --data ... --out ...

RUN_OR_MODEL: a finished run's folder (its exported EMA weights, model.safetensors + model.json) or an
exported model.safetensors. SPEC: anything data.* takes (a shard set, a weighted list, a brace
pattern, shards indexed in place), or a raw folder, bucket prefix or manifest (CSV/JSONL/Parquet),
read directly without building shards. Images get the run's own eval transform (model.json).

OUT/parts/part-NNNNNN.parquet: one part per shard (or per --part-size raw inputs), one row per image:
key, source, sha256, pred, pred_name, confidence, topk_ids, topk_probs, true_label (when the sample
carries one). Part n is predicted by rank n mod world, so each image is predicted exactly once on any
number of ranks; parts are written atomically, a killed run rerun with the same command predicts only
the missing parts, and a rerun of a finished one rewrites nothing. OUT/summary.json: counts, throughput,
agreement with the true labels where known, the predictions' class histogram.

Confidences are calibrated: softmax(logits / T), T fitted by temperature scaling (Guo et al. 2017) on
the run's eval set at the end of training and kept in model.json, or on --calibrate-on SPEC here;
the summary then holds the NLL and ECE before and after, and OUT/reliability.png the diagram.

--to-shards DST --min-confidence P: the predictions at confidence >= P become a labeled shard set
(shard n from part n; cls = the prediction; json: teacher, confidence, source, key, sha256, true
label when known), complete when DST/index.json appears: give it as data.labeled, alone or weighted
beside the human labels (data.labeled=[{path: HUMAN, weight: 1}, {path: DST, weight: 1}]).
"""
import argparse
import sys

from distssl.cli import command
from distssl.distributed.collectives import end_group
from distssl.distributed.peers import init_distributed, use_cuda
from distssl.errors import UserError
from distssl.predict.job import PredictJob, run_job
from distssl.predict.parts import make_parts
from distssl.predict.select import CSV_NAME, SHEET_NAME, write_selection
from distssl.storage import store


@command
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="a finished run's folder, or an exported model.safetensors")
    p.add_argument("--data", required=True, help="shard set / pattern / weighted list, or a raw folder or manifest")
    p.add_argument("--out", required=True, help="output folder or URL (parts/ and summary.json)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--topk", type=int, default=5, help="classes kept per image in topk_ids/topk_probs (default 5)")
    p.add_argument("--part-size", type=int, default=1000, help="raw inputs per part (shard sets: a shard a part)")
    p.add_argument("--calibrate-on", metavar="SPEC",
                   help="fit the softmax temperature on this labeled set (e.g. the run's eval shards) before "
                        "predicting; default: the temperature in model.json, if the run fitted one, else 1")
    p.add_argument("--to-shards", metavar="DST",
                   help="also write the confident predictions as a labeled shard set DST (cls = the prediction; the "
                        "json keeps teacher, confidence, source, key and sha256): usable as data.labeled")
    p.add_argument("--min-confidence", type=float, default=0.95,
                   help="with --to-shards: the calibrated confidence a prediction needs (default 0.95)")
    p.add_argument("--select", type=int, default=0, metavar="N",
                   help="also list the N images most worth labelling in OUT/to_label.csv (smallest margin between "
                        "the top two calibrated classes, spread over the predicted classes, duplicates once) with a "
                        "contact sheet OUT/to_label.png; fill its label column and give it to distssl-shards")
    p.add_argument("--workers", type=int, default=-1,
                   help="loader processes decoding images for each rank (0: in the rank's own process; default: "
                        "the node's cores shared by its ranks, one kept for each rank, at most 8)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    a, _ = p.parse_known_args(argv)  # the deepspeed launcher adds --local_rank
    if a.batch_size < 1 or a.topk < 1 or a.part_size < 1 or a.select < 0:
        p.error("--batch-size, --topk and --part-size must be at least 1, --select at least 0")
    if a.select and a.topk < 2:
        a.topk = 2  # the margin needs the top two classes
    if not 0.0 <= a.min_confidence <= 1.0:
        p.error(f"--min-confidence {a.min_confidence}: a probability, 0..1")

    import torch

    rank, world, local_rank = init_distributed(30)
    device = torch.device(f"cuda:{local_rank}") if use_cuda() else torch.device("cpu")
    job = PredictJob(a.model, a.data, a.out, a.batch_size, a.topk, a.part_size, a.calibrate_on, a.to_shards,
                     a.min_confidence, progress=not a.quiet, workers=a.workers)
    try:
        summary = run_job(job, rank, world, device)
    except (UserError, FileNotFoundError, ValueError) as e:
        if rank == 0:
            print(f"distssl-predict: error: {e}", file=sys.stderr)
        return 2
    if rank == 0:
        report(summary, job, world)
        if a.select:

            rows = write_selection(a.out, make_parts(a.data, a.part_size), a.select)
            classes = len({r["pred_name"] for r in rows})
            print(f"{len(rows)} images to label, over {classes} predicted classes: {a.out}/{CSV_NAME} (fill its label "
                  f"column, then distssl-shards it) and {a.out}/{SHEET_NAME}")
    end_group()
    return 0


def report(summary: dict, job, world: int) -> None:
    """The job's outcome in two lines (rank 0)."""

    agree = f", {100 * summary['agreement']:.2f}% agree with the true labels" if summary["agreement"] is not None \
        else ""
    if summary.get("unknown") is not None:  # the model has an outlier head (ssl.open_set)
        agree += f", {summary['unknown']} named unknown (outside the label set)"
    written = summary["parts_written_this_launch"]
    print(f"predicted {summary['predicted']} images in {summary['parts']} parts ({summary['unreadable']} unreadable)"
          f"{agree}; {world} rank(s); " + (f"{written} file(s) written this launch" if written else
                                          "already finished: nothing rewritten") + f"; {job.out}/summary.json")
    cal = summary.get("calibration") or {}
    print(f"confidences at temperature {cal['temperature']:.4g} (fitted on {cal.get('fitted_on')})"
          if cal.get("temperature") is not None else f"confidences not calibrated: {cal.get('note', 'no temperature')}")
    index = summary.get("pseudo_index")
    if job.to_shards and index is not None:
        print(f"{store.redact(job.to_shards)}: {index['count']} of {index['pseudo_labels']['predicted']} images "
              f"at confidence >= {job.min_confidence} as a labeled shard set ({len(index['shards'])} shards)")


if __name__ == "__main__":
    sys.exit(main())
