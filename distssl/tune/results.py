"""A finished sweep's outputs: results.csv (one row per trial, sorted by the metric, with each trial's
status and the cause of a failure in one line), best_config.yaml (a complete training config) and a plot."""
from __future__ import annotations

import csv
import re
from pathlib import Path

from distssl.config import dump_yaml
from distssl.storage import atomic
from distssl.tune.space import apply
from distssl.tune.sweep_record import Sweep


def write_outputs(sweep: Sweep, results, sweep_dir: str) -> dict:
    """results.csv (sorted by the metric), best_config.yaml (a complete training config), a plot."""
    metric, mode = sweep.tune.metric, sweep.tune.mode
    rows = []
    for r in results:
        values = {k: r.config[k] for k in sweep.space}
        hist = r.metrics_dataframe
        series = [] if hist is None or metric not in hist else [v for v in hist[metric].tolist() if v == v]
        best = (max(series) if mode == "max" else min(series)) if series else None
        status, error = trial_status(r, sweep.base.train.steps)
        trial_dir = (r.metrics or {}).get("out_dir")  # trials/<name>: the name the trial's folders share
        rows.append({"trial": Path(trial_dir or r.path).name, **values, f"best_{metric}": best,
                     f"last_{metric}": series[-1] if series else None,
                     "steps": (r.metrics or {}).get("step", 0), "status": status, "error": error})
    sign = -1 if mode == "max" else 1
    rows.sort(key=lambda row: (row[f"best_{metric}"] is None, sign * (row[f"best_{metric}"] or 0)))
    keys = list(sweep.space)
    with atomic.atomic_path(Path(sweep_dir) / "results.csv") as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["trial", *keys, f"best_{metric}", f"last_{metric}", "steps", "status",
                                          "error"])
        w.writeheader()
        w.writerows(rows)
    summary = {"trials": len(rows), "results_csv": str(Path(sweep_dir) / "results.csv")}
    failed = [row["trial"] for row in rows if row["status"] == "ERROR"]
    if failed:
        summary["failed_trials"] = failed
    good = [row for row in rows if row[f"best_{metric}"] is not None]
    if good:
        best = good[0]
        # the user's base and the best values; not the tune file's overrides, made for short trials
        cfg = apply(sweep.user_base or sweep.base, {k: best[k] for k in keys}, str(Path(sweep_dir) / "best"))
        dump_yaml(cfg, Path(sweep_dir) / "best_config.yaml")
        summary.update(best={k: best[k] for k in keys}, best_metric=best[f"best_{metric}"],
                       best_config=str(Path(sweep_dir) / "best_config.yaml"))
        _plot(good, keys, metric, Path(sweep_dir) / "sweep.png")
    return summary


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def error_line(error: BaseException) -> str:
    """The exception a trial died of, in one plain line: Ray wraps it in 'ray::_Inner.train() (pid=...)'
    with colour codes and the remote traceback; the last 'SomethingError: message' line is the cause."""
    lines = [_ANSI.sub("", line).strip() for line in str(error).splitlines()]
    causes = [line for line in lines if re.match(r"^[\w.]*(Error|Exception)\b.*:", line)]
    return (causes[-1] if causes else next((line for line in lines if line), type(error).__name__))[:300]


def trial_status(result, steps: int) -> tuple[str, str]:
    """(status, error) of a trial: ERROR when it raised, ended on a config error, or stopped reporting
    at its last step without writing its summary (its process died); STOPPED when ASHA stopped it."""
    metrics = result.metrics or {}
    if result.error:
        return "ERROR", error_line(result.error)
    if metrics.get("config_error"):
        return "ERROR", f"config error: {metrics['config_error']}"[:300]
    if metrics.get("step", 0) < steps:
        return "STOPPED", ""
    trial_dir = metrics.get("out_dir")
    if trial_dir and not (Path(trial_dir) / "summary.json").exists():
        return "ERROR", f"no summary.json in {trial_dir}: the trial ended after its last eval without finishing"
    return "TERMINATED", ""


def _plot(rows: list[dict], keys: list[str], metric: str, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.4), squeeze=False)
    for ax, k in zip(axes[0], keys):
        ax.scatter([r[k] for r in rows], [r[f"best_{metric}"] for r in rows])
        ax.set_xlabel(k)
        ax.set_ylabel(f"best {metric}")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic.atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=90)
    plt.close(fig)
