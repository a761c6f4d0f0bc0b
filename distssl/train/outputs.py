"""What a run gives at its evals and at its end: the EMA weights evaluated on the eval set, their calibration,
the exports (``model.*``, ``model_best.*``), and the run folder's summary, pictures and artifacts.

Every function here is collective where it says so: every rank calls it, rank 0 writes.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from distssl.calibration import calibrate
from distssl.models import export as outputs
from distssl.models.export import gather_ema_state, model_meta, write_export
from distssl.models.heads import export_state
from distssl.predict.prototypes import add_prototypes
from distssl.storage import atomic
from distssl.storage.store import redact
from distssl.tracking.metrics import MetricsWriter, plot
from distssl.train.evaluate import evaluate_ema, gathered, per_class, plot_confusion


def tail_classes(histogram) -> list[int]:
    """The third of the classes with the fewest labels (at least one class), by the labeled set's histogram;
    none when the set does not count its classes or they are balanced."""
    if not histogram or len(set(histogram)) == 1:
        return []
    order = sorted(range(len(histogram)), key=lambda c: (histogram[c], c))
    return order[:max(1, len(histogram) // 3)]


class Outputs:
    """The eval, the exports and the summary of one run (a trainer's engine, EMA, feed and algorithm)."""

    def __init__(self, trainer):
        self.tr = trainer
        self.eval_logits, self.eval_logits_step = None, None  # this rank's of the last eval (calibrate an export)

    @property
    def out(self) -> Path:
        return self.tr.out

    def evaluate(self) -> dict:
        """Collective: top-1/top-5 of the EMA weights on the eval set; this rank's logits and labels are kept for
        the calibration of an export made from this eval."""
        tr = self.tr
        batches = tr.feed.eval_batches(tr.evalset, max(1, tr.cfg.train.eval_batch_size // tr.world))
        size = tr.cfg.data.image_size
        dummy = torch.zeros(1, 3, size, size, device=tr.device, dtype=tr.dtype)
        result, self.eval_logits = evaluate_ema(tr.engine, tr.ema, batches, tr.feed.to_input, dummy, tr.zero3,
                                                keep_logits=tr.cfg.model.num_classes, head=tr.algorithm.eval_head,
                                                tail=tail_classes(tr.labeled.class_histogram))
        self.eval_logits_step = tr.step
        return result

    def calibration(self, png: Optional[Path] = None) -> tuple[dict, Optional[tuple]]:
        """Collective: the softmax temperature of the last eval's weights, fitted by temperature scaling on that
        eval's logits (gathered from every rank), with its NLL and ECE before and after, and ``png`` its
        reliability diagram (rank 0); also the gathered (logits, labels). ({}, None) on an empty eval set."""
        tr = self.tr
        logits, labels = gathered(self.eval_logits)
        if labels.numel() == 0:
            return {}, None
        report = calibrate(logits, labels, str(png) if png is not None and tr.rank == 0 else None)
        return {"temperature": report["temperature"],
                "temperature_fitted_on": f"data.eval ({redact(str(tr.cfg.data.eval))}) at step "
                                         f"{self.eval_logits_step}, the eval this export was made from",
                **{f"eval_{k}": report[k] for k in ("nll_before", "nll_after", "ece_before", "ece_after")}}, \
            (logits, labels)

    def best_top1(self) -> float:
        """The best eval top-1 so far (model_best.json, read by rank 0 and shared), -1 before any."""
        best = -1.0
        if self.tr.rank == 0:
            try:
                best = float(json.loads((self.out / outputs.BEST_META_NAME).read_text())["eval_top1"])
            except (OSError, ValueError, KeyError, TypeError):
                pass
        return self.tr.sum_over_ranks([best if self.tr.rank == 0 else 0.0])[0].item()

    def export(self, last_eval: dict, name: str = outputs.WEIGHTS_NAME, calibration: Optional[dict] = None
               ) -> Optional[Path]:
        """Collective: EMA weights -> out_dir/NAME.safetensors + NAME.json (every rank gathers, rank 0 writes): the
        final ones as model.*, the best eval's as model_best.* (as timm's CheckpointSaver keeps the best). The
        algorithm's extra heads are left out, but a balanced head becomes the classifier and an outlier head
        stays under its prefix (model.json says so)."""
        tr = self.tr
        state = gather_ema_state(tr.engine.module, tr.ema)
        if tr.rank != 0:
            return None
        a = tr.algorithm  # a balanced head is the classifier the run evaluated: exported as such
        state = export_state(state, tr.engine.module, a.heads, a.eval_head, a.kept_heads)
        d = tr.cfg.data
        calibration = dict(calibration or {})
        temperature = calibration.pop("temperature", None)
        meta = model_meta(tr.cfg.model.name, tr.cfg.model.num_classes, d.image_size, d.mean, d.std,
                          tr.evalset.class_names or tr.labeled.class_names or [],
                          {"eval_top1": last_eval.get("top1"), "weights": "ema", **calibration, **a.export_meta},
                          crop_pct=tr.feed.views.eval_crop_pct, interpolation=tr.feed.views.interpolation,
                          run=redact(str(self.out)), step=tr.step, temperature=temperature)
        if "outlier_head" in meta:  # the outlier score's class prototypes, fitted with these weights
            state, meta = add_prototypes(state, meta, d.labeled, d.eval, tr.device)
        return write_export(state, meta, self.out / name)

    def final_details(self) -> dict:
        """Collective: the final EMA weights on the eval set, per class (accuracy, precision, the confusion matrix,
        on rank 0 as confusion.png) and their softmax temperature, fitted by temperature scaling (distssl-predict
        applies it), with the eval's NLL and ECE before and after (reliability.png)."""
        tr = self.tr
        if self.eval_logits_step != tr.step:  # the last step's eval is the final one
            self.evaluate()
        calibration, got = self.calibration(self.out / "reliability.png")
        if got is None:
            return {}
        names = tr.evalset.class_names or tr.labeled.class_names or []
        classes, confusion = per_class(*got, names)
        if tr.rank == 0:
            plot_confusion(confusion, names, self.out / "confusion.png")
        return {"calibration": calibration, "per_class": classes}

    def already_written(self) -> Optional[dict]:
        """The final eval from summary.json when it holds this step and the export is beside it, on every rank
        (all or none skip, since the eval and the export are collective), else None."""
        tr = self.tr
        try:
            summary = json.loads((self.out / "summary.json").read_text())
            exported = (self.out / outputs.WEIGHTS_NAME).exists()
            found = summary.get("step") == tr.step and exported and "top1" in summary
        except (OSError, ValueError):
            found = False
        if tr.sum_over_ranks([float(found)])[0] < tr.world:
            return None
        keys = ("top1", "top5", "eval_images", "eval_skipped", "balanced_top1", "tail_recall")
        return {k: summary[k] for k in keys if k in summary}

    def finish(self, progress, metrics: MetricsWriter) -> dict:
        """Collective: the final eval, exports and summary; a rerun of a finished run (killed between its last
        checkpoint and its outputs, or restored by a sweep) reports them again and leaves them."""
        tr = self.tr
        last_eval = progress.last_eval
        if not last_eval:  # the run was already finished
            written = self.already_written()
            last_eval = written if written is not None else self.evaluate()
            if tr.on_eval is not None:  # a restored sweep trial reports its result again (Ray expects one)
                tr.on_eval(tr.step, dict(last_eval), tr.checkpoints.path(tr.step))
            if written is not None:
                metrics.message(f"already finished at step {tr.step}: eval top-1 {100 * written['top1']:.2f}% "
                                f"(from {self.out / 'summary.json'})")
                metrics.close()
                return written
        details = self.final_details()
        exported = self.export(last_eval, calibration=details.get("calibration"))
        if exported is not None:
            metrics.message(f"exported EMA weights to {exported} (+ {outputs.META_NAME}; load with timm, see README); "
                            f"the best eval's ({100 * progress.best_top1:.2f}%) to {self.out / outputs.BEST_NAME}")
        if tr.rank == 0:
            plot(self.out / "metrics.jsonl", self.out / "curves.png")
            pictured = tr.feed.write_outputs(self.out, tr.step)  # a learned augmentation, pictured and in numbers
            summary = {"step": tr.step, **last_eval, "best_top1": progress.best_top1, "out_dir": str(self.out),
                       **progress.throughput(),
                       **details, **({"derived": tr.algorithm.derived} if tr.algorithm.derived else {})}
            atomic.write_text(self.out / "summary.json", json.dumps(summary, indent=1))
            if details:  # per class and the calibration, to the trackers too
                metrics.log("final_eval", tr.step, {
                    **{f"per_class/{name}/{k}": c[k] for name, c in details["per_class"].items()
                       for k in ("accuracy", "precision")},
                    **{k: v for k, v in details["calibration"].items() if isinstance(v, (int, float))}})
            metrics.artifacts([self.out / n for n in ("config.yaml", "summary.json", "curves.png", "confusion.png",
                                                      outputs.WEIGHTS_NAME, outputs.META_NAME, outputs.BEST_NAME,
                                                      outputs.BEST_META_NAME)] + pictured)
        metrics.close()
        return last_eval
