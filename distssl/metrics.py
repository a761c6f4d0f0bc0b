"""Rank-0 outputs: a progress bar, metrics.jsonl, the trackers (distssl.loggers) and an end-of-run plot."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Optional


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
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(l + "\n" for l in keep))
    os.replace(tmp, path)


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
        from tqdm import tqdm

        from distssl.loggers import open_loggers

        self.jsonl_path = self.out / "metrics.jsonl"
        truncate_after(self.jsonl_path, start_step)
        self.jsonl = open(self.jsonl_path, "a")
        self.trackers = open_loggers(list(loggers), self.out, start_step, params or {})
        self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
                        mininterval=1.0)

    def log(self, kind: str, step: int, values: dict) -> None:
        if not self.enabled:
            return
        from distssl.loggers import numbers

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
    """top-1 and mask rate against step; returns False when there is nothing to plot."""
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
    fig, ax = plt.subplots(figsize=(7, 4))
    if evals:
        ax.plot([r["step"] for r in evals], [r["top1"] for r in evals], "o-", label="eval top-1 (EMA)")
    pts = [(r["step"], r["mask_rate"]) for r in train if r.get("mask_rate") is not None]
    if pts:
        ax.plot(*zip(*pts), alpha=0.7, label="mask rate")
    pts = [(r["step"], r["pseudo_acc"]) for r in train if r.get("pseudo_acc") is not None]
    if pts:
        ax.plot(*zip(*pts), alpha=0.5, label="pseudo-label acc. (masked)")
    ax.set_xlabel("step")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    ax.set_title(Path(metrics_path).parent.name)
    fig.tight_layout()
    tmp = Path(str(out_png) + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, out_png)
    return True
