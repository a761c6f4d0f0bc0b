"""One prediction job, as ``distssl-predict`` runs it and a self-training round reuses it: load the model,
cut the input into parts, calibrate, predict this rank's parts, then (rank 0) the summary and the
pseudo-labeled set's index. Collective when a process group is up: every rank calls it.

A launch that finds every part written already (a rerun of a finished job) rewrites nothing, not even
``summary.json`` or the pseudo-labeled set's ``index.json``: it reads the summary back.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

import torch

from distssl.calibration import calibrate
from distssl.distributed.collectives import sum_numbers
from distssl.predict.model import load_predictor
from distssl.predict.parts import make_parts
from distssl.predict.pseudo import confident_rows, shard_done, write_pseudo_index, write_pseudo_shard
from distssl.predict.rank_parts import check_temperature, labeled_logits, predict_parts, summarise
from distssl.storage import store


@dataclass
class PredictJob:
    model: str  # a finished run's folder, or an exported model.safetensors
    data: object  # a data spec (str, or a weighted list) or a raw folder / manifest
    out: str
    batch_size: int = 256
    topk: int = 5
    part_size: int = 1000
    calibrate_on: Optional[str] = None
    to_shards: Optional[str] = None
    min_confidence: float = 0.95
    progress: bool = True
    workers: int = -1  # loader processes decoding for this rank; -1: the node's cores shared by its ranks


def default_workers() -> int:
    """A rank's share of the node's cores, one left for the rank itself, at most 8."""
    import os

    ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", 1)) or 1)
    return min(8, max(1, (os.cpu_count() or 1) // ranks_here - 1))


def run_job(job: PredictJob, rank: int, world: int, device: torch.device) -> Optional[dict]:
    """Predict ``job``; rank 0 returns the summary (with ``pseudo_index`` when --to-shards), others None.
    Raises UserError / FileNotFoundError / ValueError for bad input, before any part is written."""
    predictor = load_predictor(job.model, device)
    workers = default_workers() if job.workers < 0 else job.workers
    parts = make_parts(job.data, job.part_size)
    calibration = None
    if job.calibrate_on:  # every rank fits the same T on the same (small) set: no collective needed
        logits, labels = labeled_logits(predictor, make_parts(job.calibrate_on, job.part_size), job.batch_size, device,
                                        workers)
        # drawn once: a finished job's rerun (its summary written) rewrites nothing, and its T is the same
        png = store.join(job.out, "reliability.png") if rank == 0 and "://" not in job.out and \
            not store.exists(store.join(job.out, "summary.json")) else None
        calibration = {**calibrate(logits, labels, png), "fitted_on": store.redact(job.calibrate_on)}
        predictor.temperature = calibration["temperature"]
    elif "temperature" in predictor.meta:
        calibration = {"temperature": predictor.temperature, "fitted_on": predictor.meta.get(
            "temperature_fitted_on", "the run's eval set, at the end of training")}
    else:  # said plainly: these confidences are not calibrated
        calibration = {"temperature": None, "fitted_on": None,
                       "note": "no temperature: the model's raw softmax (its model.json has none); "
                               "--calibrate-on a labeled set fits one"}
    check_temperature(job.out, parts, predictor.temperature)
    start = time.perf_counter()
    results = predict_parts(predictor, parts, job.out, rank, world, job.batch_size, job.topk, device,
                            progress=job.progress, workers=workers)
    new_shards = 0
    if job.to_shards:
        for part in parts:
            if part.number % world == rank and not shard_done(job.to_shards, part):
                chosen, predicted = confident_rows(job.out, part, job.min_confidence)
                write_pseudo_shard(job.to_shards, part, chosen, str(job.model), predicted)
                new_shards += 1
    # reduced on the device (NCCL sums only GPU tensors); also: every rank's parts are written before the summary
    images, written = sum_numbers([sum(r.rows for r in results), sum(r.written for r in results) + new_shards],
                                  device).tolist()
    if rank != 0:
        return None
    summary_url = store.join(job.out, "summary.json")
    summary = None
    if written == 0:  # every part (and pseudo shard) was there: the job was finished, leave its files alone
        try:
            summary = store.read_json(summary_url, "remove it and rerun: it is written again from the parts")
        except FileNotFoundError:
            pass
    if summary is None:
        summary = summarise(job.out, parts, predictor.class_names, time.perf_counter() - start, int(images),
                            store.redact(str(job.data)), str(job.model), calibration,
                            outlier_head=predictor.outlier_head is not None)
    summary["parts_written_this_launch"] = int(written)
    if job.to_shards:
        index = None
        if written == 0:
            try:
                index = store.read_json(store.join(job.to_shards, "index.json"), "remove it and rerun")
            except FileNotFoundError:
                pass
        if index is None:
            index = write_pseudo_index(job.to_shards, parts, predictor.class_names,
                                       {"teacher": str(job.model), "data": store.redact(str(job.data)),
                                        "min_confidence": job.min_confidence})
        summary["pseudo_index"] = index
    return summary
