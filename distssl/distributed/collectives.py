"""Every collective the trainer runs, written once, and ZeRO-3's partition layout.

The rule they keep (DESIGN.md): anything that crosses ranks is reduced or gathered here, so that a
result does not depend on the world size beyond floating-point noise. Each is a no-op in a world of
one (or before a process group exists), so the maths that calls them is tested without a cluster. No
other module calls a ``torch.distributed`` collective (tests/test_collectives.py checks): NCCL reduces
only tensors on the GPU, which the CPU tests (gloo) cannot see, so the device is chosen here.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.distributed as dist


def barrier() -> None:
    """Every rank waits here for the others (nothing in a world of one)."""
    if world_size() > 1:
        dist.barrier()


def end_group() -> None:
    """The run's last collective: wait for every rank, then end the process group (if one is up)."""
    if dist.is_available() and dist.is_initialized():
        barrier()
        dist.destroy_process_group()


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _reduced(t: torch.Tensor, op) -> torch.Tensor:
    if world_size() == 1:
        return t
    t = t.clone()  # the caller's tensor is left as it is
    dist.all_reduce(t, op=op)
    return t


def sum_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """The elementwise sum of every rank's ``t``."""
    return _reduced(t, dist.ReduceOp.SUM)


def mean_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """The elementwise mean of every rank's floating-point ``t``; integer tensors (counters) as they are."""
    if world_size() == 1 or not t.is_floating_point():
        return t
    return sum_over_ranks(t) / world_size()


def min_over_ranks(t: torch.Tensor) -> torch.Tensor:
    return _reduced(t, dist.ReduceOp.MIN)


def sum_numbers(values: Sequence[float] | torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    """A few numbers summed over ranks in float64, reduced on ``device`` (the training device: NCCL
    reduces only GPU tensors), returned on the CPU."""
    return sum_over_ranks(torch.as_tensor(values, dtype=torch.float64, device=device)).cpu()


def gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Every rank's ``t`` (the same shape on each), concatenated in rank order."""
    if world_size() == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Every rank's rows of ``t`` (any number per rank, the same trailing shape), concatenated in rank order."""
    if world_size() == 1:
        return t
    counts = gather_cat(torch.tensor([t.shape[0]], device=t.device))
    most = int(counts.max())
    padded = torch.zeros((most, *t.shape[1:]), dtype=t.dtype, device=t.device)
    padded[: t.shape[0]] = t
    every = gather_cat(padded)
    return torch.cat([every[r * most: r * most + int(n)] for r, n in enumerate(counts.tolist())])


# --- ZeRO-3's partitions -------------------------------------------------------------------------
# ZeRO-3 keeps ceil(numel / world) elements of each parameter per rank (``ds_tensor``, the last rank's
# padded), except "persistent" parameters (small ones every rank keeps whole).

def is_partitioned(p: torch.nn.Parameter) -> bool:
    return hasattr(p, "ds_tensor") and not getattr(p, "ds_persist", False)


def owned(p: torch.nn.Parameter) -> torch.Tensor:
    """The tensor this rank holds of ``p``: its ZeRO-3 partition, else the whole parameter."""
    return p.ds_tensor.data if is_partitioned(p) else p.data


def full_shape(p: torch.nn.Parameter) -> torch.Size:
    return torch.Size(getattr(p, "ds_shape", p.shape))


def from_partitions(parts: Sequence[torch.Tensor], shape: Sequence[int]) -> torch.Tensor:
    """The whole tensor from every rank's partition in rank order (cut to size), or from one whole copy."""
    shape = torch.Size(shape)
    if parts[0].shape == shape:
        return parts[0].clone()  # not partitioned (ZeRO 0-2, or a persistent parameter)
    return torch.cat([p.reshape(-1) for p in parts])[:math.prod(shape)].reshape(shape).clone()


def gather_partitioned(part: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Collective: the whole tensor of which each rank holds the partition ``part``."""
    shape = torch.Size(shape)
    return gather_cat(part.reshape(-1))[:math.prod(shape)].reshape(shape).clone()  # a copy, not a view of ``part``


def partition_of(full: torch.Tensor, per_rank: int, at_rank: int | None = None,
                 world: int | None = None) -> torch.Tensor:
    """Rank ``at_rank``'s partition of ``full`` in a world of ``world`` (this rank's, in this world, by
    default): ``per_rank`` elements, the last rank's zero-padded."""
    r = rank() if at_rank is None else at_rank
    flat = full.new_zeros(per_rank * (world_size() if world is None else world))
    flat[: full.numel()] = full.flatten()
    return flat[r * per_rank:(r + 1) * per_rank]
