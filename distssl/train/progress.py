"""What the training loop reports as it goes: the progress bar, the metrics averaged over each
run.log_every steps, throughput, and the evals with the best top-1 so far."""
from __future__ import annotations

import math
import time

import numpy as np
import torch

from distssl.distributed.peers import write_heartbeat
from distssl.models import export as outputs
from distssl.tracking.metrics import MetricsWriter


def nanmean_by_key(values: dict[str, list]) -> dict:
    """Mean of each key ignoring NaNs (e.g. pseudo-label accuracy when no label passed tau); NaN if all are.
    A key with device tensors among its values gets a device tensor: reading it waits for the device."""
    out: dict = {}
    for k, v in values.items():
        on = next((x.device for x in v if isinstance(x, torch.Tensor)), None)
        if on is None:
            out[k] = float("nan") if all(math.isnan(x) for x in v) else float(np.nanmean(v))
        else:
            out[k] = torch.stack([x.detach().float().reshape(()) if isinstance(x, torch.Tensor)
                                  else torch.tensor(float(x), device=on) for x in v]).nanmean()
    return out


def read_back(values: dict) -> dict[str, float]:
    """Every tensor of ``values`` to the host in one copy (one wait for the device, not one per key)."""
    keys = [k for k, v in values.items() if isinstance(v, torch.Tensor)]
    got = dict(zip(keys, torch.stack([values[k].float().reshape(()) for k in keys]).tolist())) if keys else {}
    return {k: got.get(k, v) for k, v in values.items()}


class Progress:
    """What the loop reports as it goes: the progress bar, the averaged metrics every run.log_every
    steps, throughput, and the evals with the best top-1 so far (whose weights it exports)."""

    def __init__(self, trainer, metrics: MetricsWriter):
        cfg = trainer.cfg
        self.trainer, self.metrics, self.log_every = trainer, metrics, cfg.run.log_every
        mu = cfg.ssl.mu if cfg.ssl.lambda_u > 0 else 0
        views_per_image = len(trainer.algorithm.needs.views)  # images the loader makes of each unlabeled one
        self.images_per_step = cfg.train.batch_size * (1 + views_per_image * mu)
        self.samples_per_step = cfg.train.batch_size * (1 + mu)
        self.best_top1 = trainer.outputs.best_top1()
        self.last_eval: dict = {}
        self.acc: dict[str, list] = {}
        self.shown: dict = {}
        self.t0, self.step0 = time.time(), trainer.step

    def step(self, stats: dict) -> None:
        """One step's stats (device tensors among them): kept, and read back once per run.log_every steps,
        so that the loop does not wait for the device every step; the bar shows the last interval's."""
        tr = self.trainer
        for k, v in stats.items():
            self.acc.setdefault(k, []).append(v)
        img_s = self.images_per_step * (tr.step - self.step0) / max(1e-9, time.time() - self.t0)
        if tr.step % self.log_every == 0 or tr.step == tr.cfg.train.steps:
            write_heartbeat(tr.out, tr.rank, tr.step)
            rec = read_back(nanmean_by_key(self.acc))
            rec.update({"img_s": img_s, "data/skipped": tr.state.skipped_total,
                        "data/samples": tr.step * self.samples_per_step})
            self.metrics.log("train", tr.step, rec)
            self.acc = {}
            # the pseudo-label rules' mask rate, or the consistency methods' ramped weight
            self.shown = {"loss": rec["loss"], **({"mask": rec["mask_rate"]} if "mask_rate" in rec else
                                                  {"weight": rec["consistency_weight"]}
                                                  if "consistency_weight" in rec else {})}
        self.metrics.progress(tr.step, {**self.shown, "img/s": round(img_s)})

    def throughput(self) -> dict:
        """This launch's wall time, steps and images per second (summary.json)."""
        tr = self.trainer
        seconds = max(1e-9, time.time() - self.t0)
        steps = tr.step - self.step0
        return {"wall_seconds_this_launch": round(seconds, 1), "steps_this_launch": steps,
                "steps_per_s": round(steps / seconds, 3),
                "images_per_s": round(self.images_per_step * steps / seconds, 1)}

    def evaluated(self, result: dict) -> None:
        tr = self.trainer
        self.last_eval = result
        if result["top1"] > self.best_top1:  # the same on every rank: top-1 is all-reduced
            self.best_top1 = result["top1"]
            tr.outputs.export(result, outputs.BEST_NAME, calibration=tr.outputs.calibration()[0])  # on this eval
        self.metrics.log("eval", tr.step, {**result, "best_top1": self.best_top1})
        self.metrics.message(f"step {tr.step}: eval top-1 {100 * result['top1']:.2f}% "
                             f"top-5 {100 * result['top5']:.2f}% ({result['eval_images']} images, EMA)")
