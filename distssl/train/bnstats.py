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
        """Around the gradient forward: running statistics move exactly as usual; the batch's are kept.

        The bookkeeping runs as a few fused multi-tensor calls, not a few kernels per layer: on a GPU
        those per-layer launches (~270 for ResNet-50) were host time the step waited for."""
        # a layer kept in eval mode (frozen statistics) is the same function in both forwards already
        self.active = active = [m for m in self.layers if m.training]
        if not active:  # no BatchNorm in train mode: both forwards are the same function already
            self.batch = []
            yield
            return
        momenta = [m.momentum for m in active]
        means0 = torch._foreach_add([m.running_mean for m in active], 0.0)  # copies of the statistics before
        vars0 = torch._foreach_add([m.running_var for m in active], 0.0)
        counts: dict[int, int] = {}
        hooks = [m.register_forward_pre_hook(lambda mod, args, i=i: counts.__setitem__(i, args[0].numel()
                                                                                       // args[0].shape[1]))
                 for i, m in enumerate(active)]
        for m in active:
            m.momentum = 1.0  # running := this batch's mean and unbiased variance, read back below
        try:
            yield
        finally:
            for h in hooks:
                h.remove()
            for m, momentum in zip(active, momenta):
                m.momentum = momentum
            means, vars_unbiased = [m.running_mean for m in active], [m.running_var for m in active]
            for i in range(len(active)):
                if i not in counts:  # layer not reached (a branch the forward skipped): nothing moved
                    means[i], vars_unbiased[i] = means0[i], vars0[i]
            # BatchNorm normalises with the biased variance (the running one is unbiased)
            ratios = [(counts[i] - 1) / counts[i] if counts.get(i, 0) > 1 else 1.0 for i in range(len(active))]
            self.batch = list(zip(means, torch._foreach_mul(vars_unbiased, ratios)))
            # running := lerp(before, batch, momentum), as one ordinary train forward would leave them;
            # into new tensors, never in place: autograd saved the buffers this forward wrote
            factors = [mo if mo is not None else 1.0 / float(m.num_batches_tracked) for m, mo in zip(active, momenta)]
            for factor in set(factors):
                idx = [i for i, f in enumerate(factors) if f == factor]
                new_means = torch._foreach_lerp([means0[i] for i in idx], [means[i] for i in idx], factor)
                new_vars = torch._foreach_lerp([vars0[i] for i in idx], [vars_unbiased[i] for i in idx], factor)
                for i, mean, var in zip(idx, new_means, new_vars):
                    active[i].running_mean, active[i].running_var = mean, var

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

    @contextmanager
    def frozen(self) -> Iterator[None]:
        """Around a forward of inputs that must not move the running statistics (VAT's perturbed
        batches): BatchNorm still normalises with that batch's own statistics, as a train-mode forward
        does (so the gradient sees the normalisation), and the running ones are left as they were (USB's
        ``freeze_bn``)."""
        layers = [m for m in self.layers if m.training]
        saved = [(m.momentum, m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None)
                 for m in layers]
        for m in layers:
            m.momentum = 0.0  # running := (1 - 0) * running + 0 * batch
        try:
            yield
        finally:
            for m, (momentum, tracked) in zip(layers, saved):
                m.momentum = momentum
                if tracked is not None:
                    m.num_batches_tracked.copy_(tracked)
