"""Where each reader of a training stream is, and how a position saved by G readers becomes a plan
for G' readers (another number of ranks or of loader workers).

A reader's sequence is a list of shard groups: first its share of the plan's *remainder* (units an
earlier run left unread when the reader count changed), then epochs from ``next_epoch`` on, each a
(seed, epoch) shard list split over the readers. A unit is a shard minus the samples of it already
read (by their index in the shard). A position is one integer per reader: samples consumed in its
sequence, a pure function of which the open groups and their progress follow.

Changing the reader count (MosaicML Streaming's elastic determinism is the model): each old
reader's position is walked to its current group; the part of that group it consumed is found by
replaying the group's mixed order (bytes read, nothing decoded); everything no old reader has read
yet, up to the furthest epoch any old reader had reached, becomes the new remainder, split over
the new readers. So within the interrupted epoch no sample is read twice and none is skipped,
whatever the new reader count; the epochs after it are the same shard lists as before.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import numpy as np

Phase = tuple[int, int]  # (0, -1): the remainder; (1, e): epoch e


@dataclass(frozen=True)
class Unit:
    shard: int
    skip: frozenset = frozenset()  # indices (raw order) of the shard's samples already read


@dataclass
class StreamPlan:
    remainder: list[Unit] = field(default_factory=list)
    next_epoch: int = 0

    def to_json(self) -> dict:
        return {"remainder": [[u.shard, sorted(u.skip)] for u in self.remainder], "next_epoch": self.next_epoch}

    @classmethod
    def from_json(cls, d: Optional[dict]) -> "StreamPlan":
        if not d:
            return cls()
        return cls([Unit(int(s), frozenset(int(i) for i in skip)) for s, skip in d["remainder"]], int(d["next_epoch"]))


def shard_groups(n_shards: int, g: int, G: int, seed: int, group_size: int = 1,
                 epoch_shards: Optional[Callable[[int, int], np.ndarray]] = None,
                 start_epoch: int = 0) -> Iterator[tuple[int, list[int]]]:
    """Infinite (epoch, shards read together) sequence of global reader ``g`` of ``G``: each epoch's
    shard list (a (seed, epoch) permutation of the shards, or ``epoch_shards(seed, epoch)`` for
    weighted sources) is split over the readers, and this reader's part is cut into groups of at
    most ``group_size`` shards (balanced sizes) whose samples are mixed."""
    epoch = start_epoch
    while True:
        perm = (epoch_shards(seed, epoch) if epoch_shards is not None
                else np.random.default_rng([seed, epoch]).permutation(n_shards))
        mine = perm[g::G] if len(perm) >= G else perm[[g % len(perm)]]
        for group in np.array_split(mine, -(-len(mine) // group_size)):
            yield epoch, [int(s) for s in group]
        epoch += 1


def reader_groups(shards, plan: StreamPlan, g: int, G: int, seed: int,
                  group_size: int) -> Iterator[tuple[Phase, str, list[Unit]]]:
    """(phase, shuffle label, units) of reader ``g`` of ``G``, for ever."""
    mine = plan.remainder[g::G]
    for part in (np.array_split(np.arange(len(mine)), -(-len(mine) // group_size)) if mine else []):
        yield (0, -1), f"r{plan.next_epoch}", [mine[int(i)] for i in part]
    for epoch, group in shard_groups(len(shards.urls), g, G, seed, group_size, shards.epoch_shards,
                                     plan.next_epoch):
        yield (1, epoch), str(epoch), [Unit(s) for s in group]


def unit_size(counts: list[int], u: Unit) -> int:
    return counts[u.shard] - len(u.skip)


def replan(shards, plan: StreamPlan, cursors: dict[int, int], G: int, seed: int, group_size: int,
           replay: Callable[[list[Unit], int, str, int], list[tuple[int, int]]]) -> StreamPlan:
    """The plan for any new reader count that continues where ``G`` readers at ``cursors`` stopped.
    ``replay(units, g, label, n)``: the first ``n`` (unit slot, sample index) of that group's mixed
    order for reader ``g``, as the stream reads it."""
    counts = shards.counts
    if counts is None:
        raise ValueError("resuming with another number of readers needs per-shard counts (a shard set with "
                         "index.json, not a brace pattern): resume with the same ranks x train.num_workers")
    where: dict[int, tuple[Phase, list[Unit]]] = {}  # reader -> (its phase, what it has left of it)
    for g in range(G):
        pos, target = 0, cursors.get(g, 0)
        groups = reader_groups(shards, plan, g, G, seed, group_size)
        for phase, label, units in groups:
            total = sum(unit_size(counts, u) for u in units)
            if pos + total <= target:
                pos += total
                continue
            left = list(units)
            if target > pos:  # part of this group was read: which samples, by replaying its order
                read: dict[int, set[int]] = {}
                for j, index in replay(units, g, label, target - pos):
                    read.setdefault(j, set()).add(index)
                left = [Unit(u.shard, u.skip | frozenset(read.get(j, ()))) for j, u in enumerate(units)]
            for next_phase, _, more in groups:  # the rest of the same phase
                if next_phase != phase:
                    break
                left += more
            where[g] = (phase, left)
            break
    furthest = max(phase for phase, _ in where.values())
    remainder: list[Unit] = []
    for g in range(G):
        phase, left = where[g]
        remainder += left
        if phase < furthest:  # epochs this reader had not reached but another had: all of its part
            for p, _, units in reader_groups(shards, plan, g, G, seed, group_size):
                if p <= phase:
                    continue
                if p > furthest:
                    break
                remainder += units
    remainder = [u for u in remainder if unit_size(counts, u) > 0]
    next_epoch = furthest[1] + 1 if furthest[0] == 1 else plan.next_epoch
    return StreamPlan(remainder, next_epoch)
