"""Top-1 / top-5 of a run's EMA weights over its eval set, every image counted once across ranks and
loader workers, and the sum over ranks so that the figure does not depend on the world size."""
from __future__ import annotations

from typing import Callable, Iterable, Optional, Sequence

import torch

from distssl.distributed.collectives import gather_rows, sum_numbers
from distssl.storage import atomic


@torch.no_grad()
def evaluate_ema(engine, ema, batches: Iterable[dict], to_input: Callable[[torch.Tensor], torch.Tensor],
                 dummy: torch.Tensor, zero3: bool, keep_logits: int = 0, head: Optional[str] = None,
                 tail: Sequence[int] = ()) -> tuple[dict, tuple[torch.Tensor, torch.Tensor]]:
    """Collective. ``batches``: this rank's share of the eval set (each with ``x``, ``y``, and the
    ``skipped`` images a worker could not decode); ``dummy``: one input of the model's shape, forwarded
    by a rank that ran out while others have not, because under ZeRO-3 every forward gathers
    parameters and so every rank must run the same number of them. Returns (the counts, this rank's eval
    logits and labels); ``keep_logits`` is the class count (0: none kept). The logits stay on their rank:
    :func:`gathered` collects them only when they are wanted (a new best, the end of the run). ``head``: an
    extra head that stands for the classifier (a balanced one); ``tail``: the classes whose mean recall is
    ``tail_recall`` (the third with the fewest labels). ``balanced_top1`` is the mean recall over the classes
    the eval set has."""
    device = dummy.device
    forward = (lambda x: engine(x, head=head)) if head else engine
    counts = torch.zeros(4, dtype=torch.float64)  # correct@1, correct@5, seen, skipped
    per_class = None  # (2, classes): correct, seen
    kept: list[tuple[torch.Tensor, torch.Tensor]] = []
    engine.eval()
    ema.average_buffers_over_ranks()
    with ema.swapped_in():
        it = iter(batches)
        while True:
            batch = next(it, None)
            if batch is not None:
                counts[3] += batch.get("skipped", 0)
            has = batch is not None
            if zero3:
                if sum_numbers([float(has)], device)[0] == 0:
                    break
            elif not has:
                break
            if not has or "x" not in batch:
                if zero3:
                    forward(dummy)
                continue
            logits = forward(to_input(batch["x"])).float()
            y = batch["y"].to(device)
            topk = logits.topk(min(5, logits.shape[1]), dim=1).indices
            counts[0] += (topk[:, 0] == y).sum().item()
            counts[1] += (topk == y[:, None]).any(dim=1).sum().item()
            counts[2] += y.numel()
            if keep_logits:
                if per_class is None:
                    per_class = torch.zeros(2, keep_logits, dtype=torch.float64)
                per_class[0] += torch.bincount(y[topk[:, 0] == y], minlength=keep_logits)[:keep_logits].cpu().double()
                per_class[1] += torch.bincount(y, minlength=keep_logits)[:keep_logits].cpu().double()
            if keep_logits:
                kept.append((logits.detach(), y))
    classes = keep_logits  # every rank the same count (a rank may have seen no batch), 0: no per-class figures
    if per_class is None or per_class.shape[1] != classes:
        per_class = torch.zeros(2, classes, dtype=torch.float64)
    counts = sum_numbers(torch.cat([counts, per_class.flatten()]), device)
    counts, per_class = counts[:4], counts[4:].view(2, classes)
    n = max(1.0, counts[2].item())
    seen = per_class[1] > 0
    recall = per_class[0] / per_class[1].clamp_min(1)
    balance = {"balanced_top1": recall[seen].mean().item()} if seen.any() else {}
    tail_seen = [c for c in tail if c < classes and seen[c]]
    if tail_seen:
        balance["tail_recall"] = recall[tail_seen].mean().item()
    logits = torch.cat([lg for lg, _ in kept]) if kept else torch.zeros(0, max(1, keep_logits), device=device)
    labels = torch.cat([y for _, y in kept]) if kept else torch.zeros(0, dtype=torch.long, device=device)
    return ({"top1": counts[0].item() / n, "top5": counts[1].item() / n, "eval_images": int(counts[2].item()),
             "eval_skipped": int(counts[3].item()), **balance}, (logits, labels))


def gathered(local: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Collective: every rank's eval logits and labels (from :func:`evaluate_ema`), in rank order, on the CPU."""
    logits, labels = local
    return gather_rows(logits.float()).cpu(), gather_rows(labels.long()).cpu()


def per_class(logits: torch.Tensor, labels: torch.Tensor, names: list[str]) -> tuple[dict, torch.Tensor]:
    """({class: {count, accuracy, recall, precision}}, the confusion matrix: rows true, columns predicted).
    A class's accuracy is its recall (the share of its images predicted as it); both names are kept
    because users look for either. None where a class has no image (or no prediction, for precision)."""
    classes = logits.shape[1]
    pred = logits.argmax(dim=1)
    confusion = torch.bincount(labels.long() * classes + pred, minlength=classes * classes).view(classes, classes)
    out = {}
    for c in range(classes):
        n, hits, called = int(confusion[c].sum()), int(confusion[c, c]), int(confusion[:, c].sum())
        out[names[c] if c < len(names) else str(c)] = {
            "count": n, "accuracy": hits / n if n else None, "recall": hits / n if n else None,
            "precision": hits / called if called else None}
    return out, confusion


def plot_confusion(confusion: torch.Tensor, names: list[str], path) -> None:
    """The confusion matrix as a picture, each row normalised by its class's count (up to 50 classes
    labelled; more are drawn unlabelled)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = confusion.double()
    rows = c / c.sum(dim=1, keepdim=True).clamp_min(1)
    k = c.shape[0]
    side = min(12.0, 2.5 + 0.35 * k)
    fig, ax = plt.subplots(figsize=(side, side))
    im = ax.imshow(rows.numpy(), cmap="Blues", vmin=0, vmax=1)
    if k <= 50:
        labels = [names[i] if i < len(names) else str(i) for i in range(k)]
        ax.set_xticks(range(k), labels, rotation=90, fontsize=7)
        ax.set_yticks(range(k), labels, fontsize=7)
        if k <= 20:
            for i in range(k):
                for j in range(k):
                    if c[i, j]:
                        ax.text(j, i, int(c[i, j]), ha="center", va="center", fontsize=6,
                                color="white" if rows[i, j] > 0.5 else "black")
    ax.set(xlabel="predicted", ylabel="true", title="eval confusion (rows: share of the true class)")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    with atomic.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
