"""Calibrated confidences: temperature scaling (Guo et al. 2017, "On Calibration of Modern Neural
Networks"), its expected calibration error and a reliability diagram. Pure functions of logits and
labels, so they are tested without a model."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from distssl.storage import atomic


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, steps: int = 200) -> float:
    """The T > 0 that minimises the NLL of softmax(logits / T) on (logits, labels): one parameter,
    log T, fitted by L-BFGS (the paper's choice); the argmax, so the top-1, does not change."""
    logits, labels = logits.double(), labels.long()
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    opt.step(closure)
    t = float(log_t.detach().exp())
    return t if math.isfinite(t) and t > 0 else 1.0


def nll(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> float:
    return float(F.cross_entropy(logits.double() / temperature, labels.long()))


def reliability(probs: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> list[dict]:
    """Per equal-width confidence bin: its count, mean confidence and accuracy (empty bins kept, count 0)."""
    conf, pred = probs.max(dim=1)
    correct = (pred == labels).double()
    edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64)
    out = []
    for b in range(bins):
        lo, hi = float(edges[b]), float(edges[b + 1])
        inside = (conf > lo) & (conf <= hi) if b else (conf >= lo) & (conf <= hi)
        n = int(inside.sum())
        out.append({"low": lo, "high": hi, "count": n,
                    "confidence": float(conf[inside].double().mean()) if n else None,
                    "accuracy": float(correct[inside].mean()) if n else None})
    return out


def ece(probs: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> float:
    """Expected calibration error: sum over bins of (count / N) |accuracy - confidence|."""
    n = probs.shape[0]
    return sum(b["count"] / n * abs(b["accuracy"] - b["confidence"]) for b in reliability(probs, labels, bins)
               if b["count"]) if n else float("nan")


def reliability_png(path: str, before: list[dict], after: Optional[list[dict]], temperature: float,
                    ece_before: Optional[float] = None, ece_after: Optional[float] = None) -> None:
    """The reliability diagram: accuracy against confidence per bin, before and after scaling, each curve
    labelled with its expected calibration error."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="perfectly calibrated")
    for rows, label, e in ((before, "T = 1", ece_before), (after, f"T = {temperature:.3g}", ece_after)):
        if rows is None:
            continue
        label += f", ECE {e:.3f}" if e is not None else ""
        pts = [(b["confidence"], b["accuracy"]) for b in rows if b["count"]]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    ax.set(xlabel="confidence", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1), title="reliability")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    with atomic.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)


def calibrate(logits: torch.Tensor, labels: torch.Tensor, png: Optional[str] = None, bins: int = 15) -> dict:
    """Fit T on (logits, labels) and report what it changes: NLL and ECE before and after, the top-1
    (unchanged by T), and the reliability bins; with ``png``, the diagram too."""
    t = fit_temperature(logits, labels)
    before, after = logits.double().softmax(dim=1), (logits.double() / t).softmax(dim=1)
    rel_before, rel_after = reliability(before, labels, bins), reliability(after, labels, bins)
    ece_before, ece_after = ece(before, labels, bins), ece(after, labels, bins)
    if png:
        reliability_png(png, rel_before, rel_after, t, ece_before, ece_after)
    return {"temperature": t, "samples": int(labels.numel()),
            "top1": float((before.argmax(1) == labels).double().mean()),
            "nll_before": nll(logits, labels), "nll_after": nll(logits, labels, t),
            "ece_before": ece_before, "ece_after": ece_after, "reliability_after": rel_after}
