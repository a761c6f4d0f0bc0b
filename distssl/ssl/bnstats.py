"""Normalise a no-grad forward with the BatchNorm batch statistics of the train-mode forward before it.

The weak view only makes pseudo-labels, so it needs no gradients; but forwarded on its own in train
mode, BatchNorm normalises it with the weak batch's statistics while the strong view it supervises is
normalised with the labeled + strong batch's: the pseudo-label and the prediction it trains come from
two different functions. ``BatchStatsSharing`` records each BatchNorm layer's batch statistics during
the gradient forward and replays them as constants in the weak forward, so both views go through the
same function (the one the running statistics, and hence evaluation, follow), and the weak view adds
neither gradients nor statistics. Pooling the weak batch's statistics into the gradient forward as
constants is not the same thing: it trained far worse (docs/benchmarks.md).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional

import torch
from torch.nn.modules.batchnorm import _BatchNorm


class BatchStatsSharing:
    def __init__(self, module: torch.nn.Module):
        # layers with track_running_stats=False always normalise with their own batch: left alone
        self.layers = [m for m in module.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
        self.active: Optional[list[_BatchNorm]] = None  # the layers in train mode at the last record()
        self.batch: list[tuple[torch.Tensor, torch.Tensor]] = []  # per active layer: batch mean, biased batch var

    @contextmanager
    def record(self) -> Iterator[None]:
        """Around the gradient forward: running statistics move exactly as usual; the batch's are kept."""
        # a layer kept in eval mode (frozen statistics) is the same function in both forwards already
        self.active = [m for m in self.layers if m.training]
        before = [(m.momentum, m.running_mean.clone(), m.running_var.clone()) for m in self.active]
        counts: dict[int, int] = {}
        hooks = [m.register_forward_pre_hook(lambda mod, args, i=i: counts.__setitem__(i, args[0].numel()
                                                                                       // args[0].shape[1]))
                 for i, m in enumerate(self.active)]
        for m in self.active:
            m.momentum = 1.0  # running := this batch's mean and unbiased variance, read back below
        try:
            yield
        finally:
            for h in hooks:
                h.remove()
            # new tensors, never copy_: autograd saved the buffers this forward wrote for its backward
            self.batch = []
            for i, (m, (momentum, mean0, var0)) in enumerate(zip(self.active, before)):
                m.momentum = momentum
                if i not in counts:  # layer not reached (a branch the forward skipped)
                    m.running_mean, m.running_var = mean0, var0
                    self.batch.append((mean0, var0))
                    continue
                n = counts[i]
                mean, var_unbiased = m.running_mean, m.running_var
                self.batch.append((mean, var_unbiased * ((n - 1) / n) if n > 1 else var_unbiased))
                factor = momentum if momentum is not None else 1.0 / float(m.num_batches_tracked)
                m.running_mean = torch.lerp(mean0, mean, factor)
                m.running_var = torch.lerp(var0, var_unbiased, factor)

    @contextmanager
    def replay(self) -> Iterator[None]:
        """Around the no-grad forward: every BatchNorm normalises with the recorded batch statistics."""
        if self.active is None:
            raise RuntimeError("BatchStatsSharing.replay needs a record()ed forward first")
        saved = [(m.running_mean, m.running_var) for m in self.active]
        for m, (mean, var) in zip(self.active, self.batch):
            m.running_mean, m.running_var = mean, var
            m.eval()  # BatchNorm only: dropout and drop-path stay as they are
        try:
            yield
        finally:
            for m, (mean, var) in zip(self.active, saved):
                m.running_mean, m.running_var = mean, var
                m.train()
