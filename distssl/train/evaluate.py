"""Top-1 / top-5 of a run's EMA weights over its eval set, every image counted once across ranks and
loader workers, and the sum over ranks so that the figure does not depend on the world size."""
from __future__ import annotations

from typing import Callable, Iterable

import torch

from distssl.dist.collectives import gather_rows, sum_numbers


@torch.no_grad()
def evaluate_ema(engine, ema, batches: Iterable[dict], to_input: Callable[[torch.Tensor], torch.Tensor],
                 dummy: torch.Tensor, zero3: bool, keep_logits: int = 0) -> dict:
    """Collective. ``batches``: this rank's share of the eval set (each with ``x``, ``y``, and the
    ``skipped`` images a worker could not decode); ``dummy``: one input of the model's shape, forwarded
    by a rank that ran out while others have not, because under ZeRO-3 every forward gathers
    parameters and so every rank must run the same number of them. ``keep_logits`` (the class count, 0 =
    off): the result also holds every rank's ``logits`` and ``labels`` (the temperature fit at the end)."""
    device = dummy.device
    counts = torch.zeros(4, dtype=torch.float64)  # correct@1, correct@5, seen, skipped
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
                    engine(dummy)
                continue
            logits = engine(to_input(batch["x"])).float()
            y = batch["y"].to(device)
            topk = logits.topk(min(5, logits.shape[1]), dim=1).indices
            counts[0] += (topk[:, 0] == y).sum().item()
            counts[1] += (topk == y[:, None]).any(dim=1).sum().item()
            counts[2] += y.numel()
            if keep_logits:
                kept.append((logits.detach(), y))
    counts = sum_numbers(counts, device)
    n = max(1.0, counts[2].item())
    return {"top1": counts[0].item() / n, "top5": counts[1].item() / n, "eval_images": int(counts[2].item()),
            "eval_skipped": int(counts[3].item()), **(_gathered(kept, keep_logits, device) if keep_logits else {})}


def _gathered(kept: list[tuple[torch.Tensor, torch.Tensor]], classes: int, device: torch.device) -> dict:
    """Collective: every rank's eval logits and labels, in rank order."""
    logits = torch.cat([lg for lg, _ in kept]) if kept else torch.zeros(0, classes, device=device)
    labels = torch.cat([y for _, y in kept]) if kept else torch.zeros(0, dtype=torch.long, device=device)
    return {"logits": gather_rows(logits.float()).cpu(), "labels": gather_rows(labels.long()).cpu()}
