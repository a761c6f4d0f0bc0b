"""The pure pieces of a build plan: the split options, seeded draws, quotas and shard cuts.

- Every draw is seeded by (seed, stage, generation[, partition]): stage 1 the eval split, 2 the labels,
  3 the shard shuffle. A listing of one partition is seeded as builds were before partitions existed
  (``stage_rng`` without a partition), so a small bucket's plan is the one it always had.
- Images are assigned to shards by a seeded shuffle (shards mix classes), in chunks bounded by
  ``max_count`` and by listed bytes (``max_shard_bytes``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from distssl.shards.listing import Listing


def stage_rng(seed: int, stage: int, generation: int, part: Optional[int] = None) -> np.random.Generator:
    """One stage's generator; ``part`` None: a listing of one partition (generation 0 keeps the seeds of
    builds made before extensions existed)."""
    if part is None:
        return np.random.default_rng([seed, stage] if generation == 0 else [seed, stage, generation])
    return np.random.default_rng([seed, stage, generation, part])


@dataclass(frozen=True)
class SplitOptions:
    labels_per_class: Optional[int]
    label_fraction: Optional[float]
    eval_fraction: Optional[float]
    unlabeled: bool
    labeled_in_unlabeled: bool
    seed: int
    max_count: int
    max_shard_bytes: Optional[int]
    dedup: bool
    min_shards: int = 1  # each set in at least this many shards (as far as it has images): one per reader

    @property
    def label_split(self) -> bool:
        return bool(self.labels_per_class or self.label_fraction)

    @property
    def pool(self) -> str:
        """The set that takes every training image not held out: unlabeled, train (eval split only) or DST."""
        return "unlabeled" if self.label_split else "train" if self.eval_fraction else ""

    def labels_wanted(self, class_size: int) -> int:
        if self.labels_per_class:
            return self.labels_per_class
        return max(1, int(round(self.label_fraction * class_size)))


def set_order(names) -> list[str]:
    """Precedence when one content sits in several sets: eval, then labeled, then the rest."""
    rank = {"eval": 0, "labeled": 1}
    return sorted(names, key=lambda n: (rank.get(n, 2), n))


def split_quota(counts: np.ndarray, want: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``counts[p, c]`` members of class c in partition p, ``want[c]`` to take in all: each partition's
    share, in proportion to its members (largest remainder; ties by ``rng``). Columns sum to
    min(want, members); no cell exceeds its members."""
    counts = np.asarray(counts, dtype=np.int64)
    total = counts.sum(axis=0)
    want = np.minimum(np.asarray(want, dtype=np.int64), total)
    exact = counts * (want / np.maximum(total, 1))[None, :]
    quota = np.minimum(np.floor(exact).astype(np.int64), counts)
    tie = rng.random(counts.shape)
    for c in np.nonzero(quota.sum(axis=0) < want)[0]:
        left = int(want[c] - quota[:, c].sum())
        order = np.lexsort((tie[:, c], -(exact[:, c] - quota[:, c])))
        for p in order:
            if left == 0:
                break
            if quota[p, c] < counts[p, c]:
                quota[p, c] += 1
                left -= 1
    return quota


def plan_shards(listing: Listing, idx: np.ndarray, seed: int, max_count: int,
                max_bytes: Optional[int], generation: int = 0, min_shards: int = 1,
                part: Optional[int] = None) -> list[np.ndarray]:
    """A seeded shuffle of ``idx`` cut into shards of at most ``max_count`` inputs and ``max_bytes``
    listed bytes; with ``min_shards``, a set too small for that many is first cut into min_shards
    near-equal parts (20 inputs in 8: 3,3,3,3,2,2,2,2). ``part``: a partition's own shuffle."""
    rng = stage_rng(seed, 3, generation, part)
    order = rng.permutation(idx) if len(idx) else idx
    parts = [order]
    if len(order) == 0:
        return []
    if min_shards > 1 and -(-len(order) // max_count) < min_shards:
        parts = [p for p in np.array_split(order, min(min_shards, len(order))) if len(p)]
    shards = []
    for part in parts:
        start, size = 0, 0
        for j, i in enumerate(part):
            s = int(listing.sizes[i])
            if j > start and (j - start >= max_count or (max_bytes and size + s > max_bytes)):
                shards.append(part[start:j])
                start, size = j, 0
            size += s
        if len(part) > start:
            shards.append(part[start:])
    return shards
