"""Which input goes into which shard of which set: pure functions of the listing, options and seed.

- The eval split is stratified and seeded; the labeled split is drawn per class from a seeded
  permutation, verifying candidates as it goes, so a corrupt image never takes a labeled slot and
  the labeled count is exact. The unlabeled set holds every good training image, the labeled ones
  included (FixMatch trains its unlabeled loss on the whole train split), unless asked otherwise.
- Images are assigned to shards by a seeded shuffle (shards mix classes), in chunks bounded by
  ``max_count`` and by listed bytes (``max_shard_bytes``).
- With ``dedup``, inputs whose bytes are identical keep one copy: the one in eval, else the labeled
  one, else the first by key; the others are listed as failures "duplicate of SET/KEY".
- An extension (``--extend``) plans only the new inputs: those already in the set by content are
  duplicates, the rest split into eval (its fraction) and the training pool, in new shards whose
  numbers and keys follow the existing ones. The labeled split is never touched.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from distssl.shards.listing import Listing
from distssl.shards.record import Generation, SetPlan


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


def _by_class(idx: np.ndarray, labels: np.ndarray) -> dict[int, np.ndarray]:
    return {int(c): idx[labels[idx] == c] for c in np.unique(labels[idx])}


def _rng(seed: int, stage: int, generation: int) -> np.random.Generator:
    # generation 0 keeps the seeds of builds made before extensions existed
    return np.random.default_rng([seed, stage] if generation == 0 else [seed, stage, generation])


def split_eval(listing: Listing, idx: np.ndarray, fraction: float, seed: int,
               generation: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Stratified, seeded: round(fraction x class size) of every class go to eval."""
    rng = _rng(seed, 1, generation)
    chosen = []
    for c, members in sorted(_by_class(idx, listing.labels).items()):
        k = int(round(fraction * len(members)))
        chosen.append(rng.permutation(members)[:k])
    ev = np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)
    return ev, np.setdiff1d(idx, ev)


def split_labeled(listing: Listing, idx: np.ndarray, per_class: Callable[[int], int], seed: int,
                  verify: Callable[[list[int]], list[Optional[str]]]) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """Per class, walk a seeded permutation verifying candidates until ``per_class(n)`` good ones."""
    rng = np.random.default_rng([seed, 2])
    labeled, failures, bad = [], [], []
    for c, members in sorted(_by_class(idx, listing.labels).items()):
        want = per_class(len(members))
        perm = rng.permutation(members)
        got, pos = [], 0
        while len(got) < want and pos < len(perm):
            batch = perm[pos: pos + max(8, 2 * (want - len(got)))].tolist()
            pos += len(batch)
            for i, reason in zip(batch, verify(batch)):
                if reason is None and len(got) < want:
                    got.append(i)
                elif reason is not None:
                    failures.append({"input": listing.rels[i], "reason": reason})
                    bad.append(i)
        if len(got) < want:
            name = listing.class_names[c] if c < len(listing.class_names) else c
            raise ValueError(f"class {name!r} has only {len(got)} good images; {want} labels were asked for")
        labeled.extend(got)
    lab = np.sort(np.asarray(labeled, dtype=np.int64))
    rest = np.setdiff1d(np.setdiff1d(idx, lab), np.asarray(bad, dtype=np.int64))
    return lab, rest, failures


def plan_shards(listing: Listing, idx: np.ndarray, seed: int, max_count: int,
                max_bytes: Optional[int], generation: int = 0, min_shards: int = 1,
                part: Optional[int] = None) -> list[np.ndarray]:
    """A seeded shuffle of ``idx`` cut into shards of at most ``max_count`` inputs and ``max_bytes``
    listed bytes; with ``min_shards``, a set too small for that many is first cut into min_shards
    near-equal parts (20 inputs in 8: 3,3,3,3,2,2,2,2). ``part``: a partition's own shuffle."""
    rng = _rng(seed, 3, generation) if part is None else np.random.default_rng([seed, 3, generation, part])
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


def first_copies(idx: np.ndarray, shas: list[Optional[str]], seen: dict[str, int]) -> tuple[np.ndarray, dict[int, int]]:
    """Keep the first input of each content (``seen`` carries contents kept earlier, e.g. in eval);
    returns the kept inputs and, for each dropped one, the input it duplicates."""
    kept, dup_of = [], {}
    for i in idx.tolist():
        sha = shas[i]
        if sha is None or sha not in seen:
            if sha is not None:
                seen[sha] = i
            kept.append(i)
        else:
            dup_of[i] = seen[sha]
    return np.asarray(kept, dtype=np.int64), dup_of


def _keys(sets: dict[str, SetPlan]) -> dict[int, str]:
    """Input -> "SET/KEY" of the sample it becomes, the first set in precedence order winning."""
    out: dict[int, str] = {}
    for name in set_order(sets):
        plan, k = sets[name], sets[name].first_key
        for shard in plan.shards:
            for i in shard:
                out.setdefault(i, f"{name}/{k:09d}" if name else f"{k:09d}")
                k += 1
    return out


def _duplicate_failures(listing: Listing, dup_of: dict[int, int], keys: dict[int, str]) -> list[dict]:
    return [{"input": listing.rels[i], "reason": f"duplicate of {keys.get(j, listing.rels[j])}"}
            for i, j in sorted(dup_of.items())]


def plan_first(listing: Listing, opts: SplitOptions, verify: Callable[[list[int]], list[Optional[str]]],
               hashes: Optional[list[tuple[Optional[str], Optional[str]]]]) -> Generation:
    """The first build's plan. ``hashes``: per input (sha256, None) or (None, why unreadable), with dedup."""
    idx = np.arange(len(listing), dtype=np.int64)
    shas: list[Optional[str]] = [None] * len(listing)
    pool_failures: list[dict] = []
    if hashes is not None:
        shas = [h for h, _ in hashes]
        unreadable = [i for i, (_, why) in enumerate(hashes) if why]
        pool_failures += [{"input": listing.rels[i], "reason": hashes[i][1]} for i in unreadable]
        idx = np.setdiff1d(idx, np.asarray(unreadable, dtype=np.int64))
    members: dict[str, np.ndarray] = {}
    dup_where: dict[str, dict[int, int]] = {}
    seen: dict[str, int] = {}
    if opts.eval_fraction:
        members["eval"], idx = split_eval(listing, idx, opts.eval_fraction, opts.seed)
        if len(members["eval"]) == 0:  # round(fraction x class size) is 0 for every class
            largest = max(int((listing.labels[idx] == c).sum()) for c in np.unique(listing.labels[idx]))
            raise ValueError(f"--eval-fraction {opts.eval_fraction} holds out no image: each class holds out "
                             f"round({opts.eval_fraction} x its size) and the largest has {largest}; give a fraction "
                             f"of at least {0.5 / max(1, largest):.3g}, or build the eval set from its own folder")
        if opts.dedup:
            members["eval"], dup_where["eval"] = first_copies(members["eval"], shas, seen)
    if opts.dedup:
        idx, dup_where[opts.pool] = first_copies(idx, shas, seen)
    if opts.label_split:
        lab, rest, bad = split_labeled(listing, idx, opts.labels_wanted, opts.seed, verify)
        members["labeled"] = lab
        members["unlabeled"] = np.union1d(rest, lab) if opts.labeled_in_unlabeled else rest
        pool_failures = bad + pool_failures  # listed with the set they would have fed
    else:
        members[opts.pool] = idx
    sets = {name: SetPlan([s.tolist() for s in plan_shards(listing, m, opts.seed, opts.max_count,
                                                              opts.max_shard_bytes, 0, opts.min_shards)])
            for name, m in members.items()}
    keys = _keys(sets)
    for name, plan in sets.items():
        plan.failures = ((pool_failures if name == opts.pool else [])
                         + _duplicate_failures(listing, dup_where.get(name, {}), keys))
    return Generation(list(listing.rels), [int(s) for s in listing.sizes], [int(x) for x in listing.labels],
                      shas, sets)


def plan_extension(listing: Listing, opts: SplitOptions, generation: int, offsets: dict[str, tuple[int, int]],
                   hashes: Optional[list[tuple[Optional[str], Optional[str]]]], existing: dict[str, str],
                   removed: list[str], changed: list[str]) -> Generation:
    """Generation ``generation``: ``listing`` holds only the new inputs; ``existing`` maps the content
    hash of every sample already written to its SET/KEY; ``offsets`` gives each set's next shard
    number and key. New inputs whose bytes are already there are duplicates, whatever ``dedup``."""
    idx = np.arange(len(listing), dtype=np.int64)
    shas: list[Optional[str]] = [None] * len(listing)
    pool_failures: list[dict] = []
    if hashes is not None:
        shas = [h for h, _ in hashes]
        for i, (sha, why) in enumerate(hashes):
            if why:
                pool_failures.append({"input": listing.rels[i], "reason": why})
            elif sha in existing:
                pool_failures.append({"input": listing.rels[i], "reason": f"duplicate of {existing[sha]}"})
        known = {i for i, (sha, why) in enumerate(hashes) if why or sha in existing}
        idx = np.asarray([i for i in idx.tolist() if i not in known], dtype=np.int64)
    members: dict[str, np.ndarray] = {}
    dup_where: dict[str, dict[int, int]] = {}
    seen: dict[str, int] = {}
    if opts.eval_fraction:
        members["eval"], idx = split_eval(listing, idx, opts.eval_fraction, opts.seed, generation)
        members["eval"], dup_where["eval"] = first_copies(members["eval"], shas, seen)
    members[opts.pool], dup_where[opts.pool] = first_copies(idx, shas, seen)
    sets = {}
    for name, m in members.items():
        first_shard, first_key = offsets.get(name, (0, 0))
        shards = plan_shards(listing, m, opts.seed, opts.max_count, opts.max_shard_bytes, generation, opts.min_shards)
        sets[name] = SetPlan([s.tolist() for s in shards], first_shard, first_key)
    keys = _keys(sets)
    for name, plan in sets.items():
        plan.failures = ((pool_failures if name == opts.pool else [])
                         + _duplicate_failures(listing, dup_where.get(name, {}), keys))
    return Generation(list(listing.rels), [int(s) for s in listing.sizes], [int(x) for x in listing.labels],
                      shas, sets, removed=removed, changed=changed)
