"""EMA teacher weights for evaluation that also work under ZeRO-3.

Each rank averages only the tensor it owns: the full parameter under ZeRO 0-2, its partition
(``ds_tensor``) under ZeRO-3, or the full tensor of a ZeRO-3 "persistent" parameter (small ones
DeepSpeed keeps gathered). Evaluation swaps the averages in place and back, so no rank ever
materialises a second full model. The decay warms up (timm ModelEmaV3 ``use_warmup``): with a
flat 0.999 a 1,000-step run would evaluate mostly its initial weights. Floating-point buffers
(BatchNorm running statistics) are averaged with the same decay, as FixMatch's reference code
averages every model variable: the live model's statistics follow the last few steps' weights, not
the averaged ones, and score lower with the EMA weights (docs/benchmarks.md, development notes).
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from distssl.distributed.collectives import mean_over_ranks, owned, world_size


def ema_decay_at(step: int, decay: float, warmup: bool, gamma: float = 1.0, power: float = 0.75) -> float:
    """min(decay, 1 - (1 + step / gamma) ** -power) with warm-up, else ``decay``."""
    if not warmup:
        return decay
    return max(0.0, min(decay, 1.0 - (1.0 + step / gamma) ** -power))


class EMA:
    def __init__(self, module: torch.nn.Module, decay: float, warmup: bool = True):
        self.module, self.decay, self.warmup = module, decay, warmup
        self.params = [(n, p) for n, p in module.named_parameters()]
        self.shadow = {n: owned(p).detach().float().clone() for n, p in self.params}
        self.buffers = {n: b.detach().clone() for n, b in module.named_buffers()}

    @torch.no_grad()
    def update(self, step: int) -> float:
        d = ema_decay_at(step, self.decay, self.warmup)
        # one fused call per list, not two kernels per tensor: ~600 launches per step for ResNet-50
        averaged, current = [self.shadow[n] for n, _ in self.params], [owned(p).float() for _, p in self.params]
        counters, counts = [], []
        for n, b in self.module.named_buffers():
            if b.is_floating_point():  # BatchNorm statistics, averaged like the weights they belong to
                averaged.append(self.buffers[n])
                current.append(b)
            else:
                counters.append(self.buffers[n])
                counts.append(b)
        if averaged:
            torch._foreach_lerp_(averaged, current, 1.0 - d)  # d * shadow + (1 - d) * current
        if counters:
            torch._foreach_copy_(counters, counts)
        return d

    @torch.no_grad()
    def average_buffers_over_ranks(self) -> None:
        """Each rank's BatchNorm running statistics come from its own share of the batch, so the EMA's
        differ between ranks: averaged over ranks before an eval (timm's distribute_bn "reduce"), every
        rank evaluates, and the export holds, one model (else the reported top-1 mixes per-rank models
        and the exported rank-0 weights score differently)."""
        average_over_ranks(self.buffers.values())

    @contextlib.contextmanager
    @torch.no_grad()
    def swapped_in(self) -> Iterator[None]:
        """Evaluate with the EMA weights, then restore the training weights."""
        saved_p = {n: owned(p).clone() for n, p in self.params}
        saved_b = {n: b.clone() for n, b in self.module.named_buffers()}
        try:
            for n, p in self.params:
                owned(p).copy_(self.shadow[n])
            for n, b in self.module.named_buffers():
                b.copy_(self.buffers[n])
            yield
        finally:
            for n, p in self.params:
                owned(p).copy_(saved_p[n])
            for n, b in self.module.named_buffers():
                b.copy_(saved_b[n])

    def state_dict(self) -> dict:
        return {"shadow": {n: t.clone() for n, t in self.shadow.items()},
                "buffers": {n: t.clone() for n, t in self.buffers.items()}}

    def load_state_dict(self, state: dict) -> None:
        for n, t in state["shadow"].items():
            if self.shadow[n].shape != t.shape:
                raise ValueError(f"EMA tensor {n}: saved shape {tuple(t.shape)} != {tuple(self.shadow[n].shape)} "
                                 f"(was the run saved with another world size or ZeRO stage?)")
            self.shadow[n].copy_(t)
        for n, t in state["buffers"].items():
            self.buffers[n].copy_(t)


@torch.no_grad()
def average_over_ranks(buffers) -> None:
    """The floating-point ``buffers`` (BatchNorm running statistics) replaced by their mean over ranks,
    in one all-reduce."""
    floats = [b for b in buffers if b.is_floating_point()]
    if world_size() == 1 or not floats:
        return
    flat = mean_over_ranks(torch.cat([b.reshape(-1) for b in floats]))
    parts = flat.split([b.numel() for b in floats])
    torch._foreach_copy_(floats, [part.view_as(b) for part, b in zip(parts, floats)])
