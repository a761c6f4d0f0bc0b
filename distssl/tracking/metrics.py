"""Rank-0 outputs: a progress bar, metrics.jsonl, the trackers (distssl.tracking.loggers) and an end-of-run plot."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

from distssl.storage import atomic
from distssl.tracking.loggers import numbers, open_loggers
from distssl.tracking.progress import bar as progress_bar


def truncate_after(path: Path, step: int) -> None:
    """Drop lines logged after ``step`` (a resumed run re-logs them; the curve must not repeat)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill
        if rec.get("step", 0) <= step:
            keep.append(line)
    atomic.write_text(path, "".join(l + "\n" for l in keep))


def _clean(v):
    if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
        return None
    return v


class MetricsWriter:
    """metrics.jsonl, the progress bar and the trackers of ``run.loggers``; does nothing on ranks other than 0."""

    def __init__(self, out_dir: str, enabled: bool, start_step: int, total_steps: int,
                 loggers: tuple[str, ...] = ("tensorboard",), params: Optional[dict] = None):
        self.enabled = enabled
        self.out = Path(out_dir)
        self.bar = None
        self.trackers: list = []
        if not enabled:
            return
        self.jsonl_path = self.out / "metrics.jsonl"
        truncate_after(self.jsonl_path, start_step)
        self.jsonl = open(self.jsonl_path, "a")
        self.trackers = open_loggers(list(loggers), self.out, start_step, params or {})
        self.bar = progress_bar(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
                                mininterval=1.0)

    def log(self, kind: str, step: int, values: dict) -> None:
        if not self.enabled:
            return

        rec = {"kind": kind, "step": step, **{k: _clean(v) for k, v in values.items()}}
        self.jsonl.write(json.dumps(rec) + "\n")
        self.jsonl.flush()
        self._each("metrics", step, numbers(kind, values))

    def _each(self, method: str, *args) -> None:
        """Call every tracker; one that fails (its server gone, a full disk) is dropped with a warning,
        and training goes on: metrics.jsonl keeps everything."""
        for tracker in list(self.trackers):
            try:
                getattr(tracker, method)(*args)
            except Exception as e:
                self.trackers.remove(tracker)
                self.message(f"warning: {type(tracker).__name__} failed ({type(e).__name__}: {e}); it gets no more "
                             f"of this run, {self.jsonl_path} has every metric line")

    def artifacts(self, paths: list[Path]) -> None:
        """The run's output files, to every tracker that keeps files (MLflow, W&B)."""
        if self.enabled:
            self._each("artifacts", [p for p in paths if p.exists()])

    def progress(self, step: int, postfix: Optional[dict] = None) -> None:
        if self.bar is not None:
            self.bar.n = step
            if postfix:
                self.bar.set_postfix({k: (f"{v:.3g}" if isinstance(v, float) else v) for k, v in postfix.items()},
                                     refresh=False)
            self.bar.refresh()

    def message(self, text: str) -> None:
        if self.enabled:
            (self.bar.write if self.bar is not None else print)(text)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        self._each("close")
        self.trackers = []
        self.jsonl.close()
        self.enabled = False


def plot(metrics_path: str | Path, out_png: str | Path) -> bool:
    """Two panels against step: the losses (total, labeled, unlabeled; log scale) and the rates (eval
    top-1 of the EMA weights, on an imbalanced labeled set its balanced top-1 and the tail's recall, mask rate,
    pseudo-label accuracy). False when there is nothing to plot."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, evals = [], []
    for line in Path(metrics_path).read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        (evals if rec.get("kind") == "eval" else train).append(rec)
    if not train and not evals:
        return False

    def series(recs, key):
        return [(r["step"], r[key]) for r in recs if isinstance(r.get(key), (int, float)) and r[key] == r[key]]

    fig, (ax_loss, ax) = plt.subplots(1, 2, figsize=(12, 4))
    for key, label in (("loss", "loss"), ("loss_x", "labeled CE"), ("loss_u", "unlabeled (masked)")):
        pts = series(train, key)
        if pts:
            ax_loss.plot(*zip(*pts), alpha=0.8, label=label)
    if ax_loss.lines:
        if all(y > 0 for line in ax_loss.lines for y in line.get_ydata()):
            ax_loss.set_yscale("log")
        ax_loss.legend(loc="upper right")
    ax_loss.set_xlabel("step")
    ax_loss.set_title("training loss")
    ax_loss.grid(alpha=0.3)
    if evals:
        ax.plot([r["step"] for r in evals], [r["top1"] for r in evals], "o-", label="eval top-1 (EMA)")
    # on a long tail: the mean recall over classes, and over the third of the classes with the fewest labels
    for key, label in (("balanced_top1", "eval balanced top-1"), ("tail_recall", "eval tail-class recall")):
        pts = series(evals, key) if key == "tail_recall" or any("tail_recall" in r for r in evals) else []
        if pts:
            ax.plot(*zip(*pts), "s--", alpha=0.8, label=label)
    for key, label, alpha in (("mask_rate", "mask rate", 0.7), ("pseudo_acc", "pseudo-label acc. (masked)", 0.5)):
        pts = series(train, key)
        if pts:
            ax.plot(*zip(*pts), alpha=alpha, label=label)
    ax.set_xlabel("step")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    last = f": eval top-1 {100 * evals[-1]['top1']:.2f}% at step {evals[-1]['step']}" if evals else ""
    ax.set_title(f"accuracy{last}")
    fig.suptitle(str(Path(metrics_path).parent), fontsize=9)
    fig.tight_layout()
    with atomic.atomic_path(out_png) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
    return True
