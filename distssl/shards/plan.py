"""Which input goes into which shard of which set: the plan of a listing (distssl.shards.partitions), one
partition in memory at a time. A small bucket is a listing of one partition, planned by the same passes.

Every per-class count the splits need is known before any partition is planned (the listing's
``class_counts``), so the splits are divided between partitions up front, by pure functions:
``split_quota`` gives each partition its share of a class's eval images and labels, in proportion
to its members (largest remainder, ties broken by a seeded draw), so the totals are exactly the
unpartitioned build's: round(eval_fraction x class size) eval images and ``labels_per_class`` (or the
fraction) labels per class, stratified. Inside a partition the members are drawn from a seeded
permutation (seeded by the partition too), and labeled candidates are verified as they are drawn; a
class whose partition runs out of good candidates takes the rest from the next partitions' spares.

Duplicates (``--dedup``, and an extension's inputs already in the set) are found by a join on the
content hash through hash buckets on disk (never a dict of every hash): of equal bytes the eval copy
stays, else the one in the set already written, else the first by key; the rest are failures
"duplicate of SET input KEY". An extension (``--extend``) plans only the new inputs: those already in the
set by content are duplicates, the rest split into eval (its fraction) and the training pool, in new
shards whose numbers and keys follow the existing ones. The labeled split is never touched.

Each partition becomes one part of the generation: a :class:`~distssl.shards.build_record.Generation` whose
sets' shards are numbered after the previous parts', written to the record as it is planned.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import numpy as np

from distssl.errors import OptionError
from distssl.shards.build_record import Generation, SetPlan
from distssl.shards.listing import Listing
from distssl.shards.partitions import BUCKETS, PartitionedListing, Spill
from distssl.shards.splits import SplitOptions, plan_shards, split_quota, stage_rng

Verify = Callable[[Listing, list[int]], list[Optional[str]]]  # (partition, inputs) -> None (good) or why not
Hasher = Callable[[Listing], list[tuple[Optional[str], Optional[str]]]]  # partition -> (sha256, why unreadable)


def _quota_rng(seed: int, stage: int, generation: int) -> np.random.Generator:
    """The ties of one stage's quotas between partitions."""
    return np.random.default_rng([seed, stage, generation, 10_000 + stage])


@dataclass
class Selection:
    """What one partition contributes before its shards are cut (kept on disk between passes)."""
    eval: list[int] = field(default_factory=list)
    labeled: list[int] = field(default_factory=list)
    dropped: dict[int, str] = field(default_factory=dict)  # input -> why (unreadable, duplicate)
    rejected: dict[int, str] = field(default_factory=dict)  # labeled candidates that failed verification
    shas: list[Optional[str]] = field(default_factory=list)
    tried: dict[int, int] = field(default_factory=dict)  # class -> labeled candidates drawn so far

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump({"eval": self.eval, "labeled": self.labeled, "dropped": self.dropped,
                       "rejected": self.rejected, "shas": self.shas, "tried": self.tried}, f)

    @classmethod
    def load(cls, path: str) -> "Selection":
        with open(path) as f:
            d = json.load(f)
        return cls(d["eval"], d["labeled"], {int(k): v for k, v in d["dropped"].items()},
                   {int(k): v for k, v in d["rejected"].items()}, d["shas"], {int(k): v for k, v in d["tried"].items()})


def _by_class(listing: Listing, idx: np.ndarray) -> dict[int, np.ndarray]:
    """``idx``'s members of each class, in index order (one sort, not a scan per class)."""
    labels = listing.labels[idx]
    order = np.argsort(labels, kind="stable")
    classes, starts = np.unique(labels[order], return_index=True)
    return {int(c): idx[order[a:b]] for c, a, b in zip(classes, starts, list(starts[1:]) + [len(order)])}


class Planner:
    """One generation of a build: ``plan()`` yields its parts (one per partition) in order. ``existing``: content
    hash -> SET/KEY of the samples already written (an extension), as (sha, key) pairs streamed once."""

    def __init__(self, pl: PartitionedListing, opts: SplitOptions, workdir: str, verify: Verify,
                 hasher: Optional[Hasher] = None, generation: int = 0,
                 offsets: Optional[dict[str, tuple[int, int]]] = None,
                 existing: Optional[Iterator[tuple[str, str]]] = None,
                 removed: Optional[list[str]] = None, changed: Optional[list[str]] = None):
        self.pl, self.opts, self.workdir, self.verify, self.hasher = pl, opts, workdir, verify, hasher
        self.generation, self.offsets, self.existing = generation, dict(offsets or {}), existing
        self.removed, self.changed = list(removed or []), list(changed or [])  # kept with the first part
        self.first = generation == 0
        self.single = pl.partitions == 1  # seeded as an unpartitioned plan (distssl.shards.splits.stage_rng)
        os.makedirs(workdir, exist_ok=True)

    def _sel_path(self, p: int) -> str:
        return os.path.join(self.workdir, f"sel-{self.generation:03d}-{p:05d}.json")

    # -- the passes --
    def plan(self) -> Iterator[Generation]:
        P, C = self.pl.partitions, len(self.pl.class_names)
        readable = self._hash_and_drop_unreadable()
        q_eval = np.zeros((P, C), dtype=np.int64)
        if self.opts.eval_fraction and C:
            want = np.round(self.opts.eval_fraction * readable.sum(axis=0)).astype(np.int64)
            q_eval = split_quota(readable, want, _quota_rng(self.opts.seed, 1, self.generation))
            if q_eval.sum() == 0:
                largest = int(readable.sum(axis=0).max())
                f = self.opts.eval_fraction
                raise OptionError("eval_fraction", f"{{0}} {f} holds out no image: each class holds out round({f} x "
                                  f"its size) and the largest has {largest}; give a fraction of at least "
                                  f"{0.5 / max(1, largest):.3g}, or build the eval set from its own folder")
        self._draw_eval(q_eval)
        pool = readable - q_eval
        if self.hasher is not None and (self.opts.dedup or not self.first):
            pool -= self._deduplicate()
        if self.first and self.opts.label_split:
            self._draw_labels(pool)
        yield from self._cut()

    def _part(self, p: int) -> Optional[int]:
        return None if self.single else p

    def _each(self) -> Iterator[tuple[int, Listing, Selection]]:
        for p in range(self.pl.partitions):
            yield p, self.pl.load(p), Selection.load(self._sel_path(p))

    def _hash_and_drop_unreadable(self) -> np.ndarray:
        """Pass 1: content hashes (when needed), unreadable inputs dropped; class counts of the rest."""
        counts = self.pl.class_counts.copy()
        for p in range(self.pl.partitions):
            sel = Selection()
            if self.hasher is not None and (self.opts.dedup or not self.first):
                listing = self.pl.load(p)
                hashes = self.hasher(listing)
                sel.shas = [h for h, _ in hashes]
                for i, (_, why) in enumerate(hashes):
                    if why:
                        sel.dropped[i] = why
                        if listing.labels[i] >= 0:
                            counts[p, listing.labels[i]] -= 1
            sel.save(self._sel_path(p))
        return counts

    def _draw_eval(self, q_eval: np.ndarray) -> None:
        """Pass 2: each partition's eval images, q_eval[p, c] of class c from a seeded permutation."""
        if not q_eval.any():
            return
        for p, listing, sel in self._each():
            idx = np.asarray([i for i in range(len(listing)) if i not in sel.dropped], dtype=np.int64)
            rng = stage_rng(self.opts.seed, 1, self.generation, self._part(p))
            groups = _by_class(listing, idx)
            for c in range(q_eval.shape[1]):
                members = groups.get(c, idx[:0])
                sel.eval += rng.permutation(members)[:q_eval[p, c]].tolist() if len(members) else []
            sel.eval.sort()
            sel.save(self._sel_path(p))

    def _deduplicate(self) -> np.ndarray:
        """Pass 3: a join on the content hash over every partition (and the samples already written):
        of equal bytes the eval copy stays, then one already in the set, then the first by key.
        Returns the pool's dropped counts by (partition, class)."""
        P, C = self.pl.partitions, len(self.pl.class_names)
        join = Spill(os.path.join(self.workdir, f"join-{self.generation:03d}"), "h")
        for sha, key in self.existing or ():
            join.add(int(sha[:8], 16) % BUCKETS, f"{sha}\t0\t{key}\t-1\t-1\n")
        for p, listing, sel in self._each():
            ev = set(sel.eval)
            for i, sha in enumerate(sel.shas):
                if sha is not None and i not in sel.dropped:
                    rank = 1 if i in ev else 2
                    join.add(int(sha[:8], 16) % BUCKETS, f"{sha}\t{rank}\t{listing.rels[i]}\t{p}\t{i}\n")
        join.flush()
        drops: dict[int, dict[int, str]] = {}
        per_file = BUCKETS // Spill.FILES
        for first in range(0, BUCKETS, per_file):  # equal hashes share a bucket, so a file's buckets at a time
            groups: dict[str, list[tuple[int, str, int, int]]] = {}
            for _, line in join.lines(first, first + per_file):
                sha, rank, key, p, i = line.rstrip("\n").split("\t")
                groups.setdefault(sha, []).append((int(rank), key, int(p), int(i)))
            for rows in groups.values():
                if len(rows) < 2:
                    continue
                rows.sort()
                rank, key, _, _ = rows[0]
                where = key if rank == 0 else f"{'eval' if rank == 1 else self.opts.pool or 'set'} input {key}"
                for _, _, p, i in rows[1:]:
                    if p >= 0:  # two samples already written alike are not this build's to drop
                        drops.setdefault(p, {})[i] = f"duplicate of {where}"
        dropped = np.zeros((P, C), dtype=np.int64)
        for p, listing, sel in self._each():
            mine = drops.get(p, {})
            if not mine:
                continue
            sel.dropped.update(mine)
            sel.eval = [i for i in sel.eval if i not in mine]
            ev = set(sel.eval)
            for i in mine:
                if i not in ev and listing.labels[i] >= 0:
                    dropped[p, listing.labels[i]] += 1
            sel.save(self._sel_path(p))
        return dropped

    def _draw_labels(self, pool: np.ndarray) -> None:
        """Pass 4: each class's labels, shared between partitions by their pool members, drawn from a seeded
        permutation and verified as drawn; a partition short of good candidates passes its shortfall on."""
        want = np.asarray([self.opts.labels_wanted(int(n)) for n in pool.sum(axis=0)], dtype=np.int64)
        quota = split_quota(pool, want, _quota_rng(self.opts.seed, 2, 0))
        short = np.zeros(pool.shape[1], dtype=np.int64)
        for rnd in range(2):  # the quotas; then whatever a partition could not fill, from the others' spares
            for p, listing, sel in self._each():
                need = quota[p] if rnd == 0 else short
                if not need.any():
                    continue
                got = self._verify_draw(p, listing, sel, need)
                if rnd == 0:
                    short += need - got
                else:
                    short -= got
                sel.save(self._sel_path(p))
            if rnd == 0 and not short.any():
                return
        if short.any():
            c = int(np.nonzero(short)[0][0])
            have = int(want[c] - short[c])
            raise ValueError(f"class {self.pl.class_names[c]!r} has only {have} good images; {int(want[c])} labels "
                             f"were asked for")

    def _verify_draw(self, p: int, listing: Listing, sel: Selection, need: np.ndarray) -> np.ndarray:
        """Up to need[c] more good labeled images of each class c from partition p, continuing its seeded
        permutation of the class where an earlier pass stopped; how many it found."""
        ev = set(sel.eval)
        idx = np.asarray([i for i in range(len(listing)) if i not in sel.dropped and i not in ev], dtype=np.int64)
        got = np.zeros_like(need)
        groups = _by_class(listing, idx)
        perms = self._label_orders(p, groups, idx[:0])
        for c in np.nonzero(need)[0].tolist():
            perm = perms(c)
            pos = sel.tried.get(c, 0)
            while got[c] < need[c] and pos < len(perm):
                batch = perm[pos: pos + max(8, 2 * int(need[c] - got[c]))]
                for i, reason in zip(batch, self.verify(listing, batch)):
                    pos += 1  # walked: taken, or dropped as a bad candidate
                    if reason is not None:
                        sel.rejected[i] = reason
                        continue
                    sel.labeled.append(i)
                    got[c] += 1
                    if got[c] == need[c]:
                        break
            sel.tried[c] = pos
        sel.labeled.sort()
        return got

    def _label_orders(self, p: int, groups: dict[int, np.ndarray], empty: np.ndarray) -> Callable[[int], list[int]]:
        """Each class's order of labeled candidates: one seeded permutation per (partition, class), or, for a
        single partition, the classes' permutations drawn in turn from one generator (the unpartitioned plan)."""
        if not self.single:
            return lambda c: np.random.default_rng([self.opts.seed, 2, p, c]).permutation(groups.get(c, empty)).tolist()
        rng = np.random.default_rng([self.opts.seed, 2])
        perms = {c: rng.permutation(members).tolist() for c, members in sorted(groups.items())}
        return lambda c: perms.get(c, [])

    def _cut(self) -> Iterator[Generation]:
        """Pass 5: each partition's sets cut into shards, numbered after the previous parts'."""
        o = self.opts
        per_part_min = max(1, math.ceil(o.min_shards / max(1, self.pl.partitions)))
        for p, listing, sel in self._each():
            ev, lab = np.asarray(sel.eval, dtype=np.int64), np.asarray(sel.labeled, dtype=np.int64)
            out = set(sel.eval) | set(sel.dropped) | set(sel.rejected)
            rest = np.asarray([i for i in range(len(listing)) if i not in out], dtype=np.int64)
            members: dict[str, np.ndarray] = {}
            if len(ev) or o.eval_fraction:
                members["eval"] = ev
            if self.first and o.label_split:
                members["labeled"] = lab
                members["unlabeled"] = rest if o.labeled_in_unlabeled else np.setdiff1d(rest, lab)
            else:
                members[o.pool] = rest
            sets = {}
            for name, m in members.items():
                first_shard, first_key = self.offsets.get(name, (0, 0))
                shards = plan_shards(listing, m, o.seed, o.max_count, o.max_shard_bytes, self.generation,
                                     per_part_min, part=self._part(p))
                sets[name] = SetPlan([s.tolist() for s in shards], first_shard, first_key)
                self.offsets[name] = (first_shard + len(shards), first_key + sets[name].planned)
            failures = [{"input": listing.rels[i], "reason": why}
                        for i, why in sorted({**sel.dropped, **sel.rejected}.items())]
            if o.pool in sets:
                sets[o.pool].failures = failures
            elif failures:
                next(iter(sets.values())).failures = failures
            yield Generation(list(listing.rels), [int(s) for s in listing.sizes], [int(x) for x in listing.labels],
                             sel.shas or [None] * len(listing), sets, removed=self.removed if p == 0 else [],
                             changed=self.changed if p == 0 else [])
