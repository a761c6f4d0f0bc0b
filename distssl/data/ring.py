"""Batches from loader workers to the training process through reused shared-memory slots.

Why: a DataLoader worker hands each batch tensor over by copying it into a fresh shared-memory
segment and passing its file descriptor through an authenticated socket connection, one per
tensor, and fresh pages cost a page fault each: worker and trainer CPU per batch that the ring saves
(measured with tools/bench/stream.py: docs/benchmarks.md, two-view stream). Here each worker collates
straight into one of ``slots`` shared buffers it allocated once, and sends only the slot number and the
tensors' layout; the training process copies the batch out (so a caller may keep batches as long as it
likes) and counts it consumed.

Flow control does not rely on the DataLoader's prefetch accounting: a worker reuses a slot only
after the training process has copied out the batch that was in it (it waits otherwise), so a
slow consumer can never see a batch overwritten.
"""
from __future__ import annotations

import math
import os
import time
from typing import Optional

import torch

_ALIGN = 64  # every tensor starts on a cache line (and any dtype's alignment)
RING_KEY = "__ring__"
# batch keys whose per-sample 1-d tensors differ in length (undecoded image bytes): a batch holds them
# as one flat tensor and their lengths as "<key>_lengths"
RAGGED_PREFIX = "bytes_"


def _aligned_bytes(t: torch.Tensor, n: int) -> int:
    """Bytes that n stacked copies of ``t`` take in a slot, rounded up to the alignment."""
    return -(-t.nbytes * n // _ALIGN) * _ALIGN


class RingWriter:
    """Worker side: ``collate(items)`` -> a small message naming the slot that holds the batch."""

    def __init__(self, slots: int):
        self.slots = slots
        self.data: Optional[torch.Tensor] = None  # (slots, slot_bytes) uint8, shared
        self.consumed: Optional[torch.Tensor] = None  # batches copied out by the reader, shared
        self.produced = 0
        self.generation = 0
        self.parent = os.getppid()

    def _allocate(self, slot_bytes: int) -> None:
        self.data = torch.zeros((self.slots, slot_bytes), dtype=torch.uint8).share_memory_()
        self.consumed = torch.zeros(1, dtype=torch.int64).share_memory_()
        self.produced, self.generation = 0, self.generation + 1

    def collate(self, items: list[dict]) -> dict:
        n = len(items)
        tensor_keys = [k for k, v in items[0].items() if isinstance(v, torch.Tensor)]
        ragged = {k: [it[k] for it in items] for k in tensor_keys if k.startswith(RAGGED_PREFIX)}
        for k, vals in ragged.items():  # one flat tensor, stacked as a batch of one
            items[0] = {**items[0], k: torch.cat(vals)}
        need = sum(_aligned_bytes(items[0][k], 1 if k in ragged else n) for k in tensor_keys)
        handle = None
        if self.data is None or need > self.data.shape[1]:  # first batch, or a larger one: new slots
            # ragged batches vary in size: room for a quarter more, so a slightly larger one fits
            self._allocate(need + need // 4 if ragged else need)
            handle = (self.data, self.consumed)
        # the slot's previous batch (produced - slots) must have been copied out
        while int(self.consumed[0]) < self.produced - self.slots + 1:
            if os.getppid() != self.parent:  # the training process is gone: nobody will free the slot
                raise SystemExit(0)
            time.sleep(0.0005)
        slot = self.produced % self.slots
        buf, off, layout, msg = self.data[slot], 0, {}, {}
        for k in tensor_keys:
            first = items[0][k]
            if k in ragged:
                buf[off:off + first.nbytes].view(first.dtype).copy_(first)
                layout[k] = (off, first.dtype, tuple(first.shape))
                msg[f"{k}_lengths"] = [v.numel() for v in ragged[k]]
                off += _aligned_bytes(first, 1)
                continue
            size = first.nbytes * n
            dst = buf[off:off + size].view(first.dtype).view(n, *first.shape)
            torch.stack([it[k] for it in items], out=dst)
            layout[k] = (off, first.dtype, (n, *first.shape))
            off += _aligned_bytes(first, n)
        for k, v in items[0].items():
            if k not in layout:
                msg[k] = [it[k] for it in items]  # small values travel in the message itself
        msg[RING_KEY] = {"ring": (os.getpid(), self.generation), "slot": slot, "layout": layout, "handle": handle}
        self.produced += 1
        return msg


class RingReader:
    """Training-process side: turns ring messages back into batches of tensors."""

    def __init__(self, pin_memory: bool = False):
        self.rings: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self.pin_memory = pin_memory

    def unpack(self, msg: dict) -> dict:
        info = msg.pop(RING_KEY, None)
        if info is None:
            return msg
        if info["handle"] is not None:
            pid = info["ring"][0]
            for key in [k for k in self.rings if k[0] == pid]:  # the worker replaced its slots
                del self.rings[key]
            self.rings[info["ring"]] = info["handle"]
        data, consumed = self.rings[info["ring"]]
        buf = data[info["slot"]]
        out = {}
        for k, (off, dtype, shape) in info["layout"].items():
            src = buf[off:off + math.prod(shape) * dtype.itemsize].view(dtype).view(shape)
            out[k] = torch.empty(shape, dtype=dtype, pin_memory=self.pin_memory).copy_(src)
        consumed += 1  # in place, in shared memory: the slot may now be reused
        for k, v in msg.items():
            out[k] = torch.tensor(v) if isinstance(v, list) else v
        return out
