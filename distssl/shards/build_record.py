"""The build record: what a shard build planned, kept beside its shards.

A build is a sequence of generations: the first build, then one per ``--extend``. Each generation
records its inputs (key, listed size, label, content hash when known) and its plan (the inputs of
every shard of every set), in ``DST/build-gNNN.json.gz``; ``DST/build.json`` holds the source, the
options that shape the plan and the list of generations. The generation file is written first and
``build.json`` after it, both before any shard, so:

- a rerun finishes the recorded plan (never a new plan mixed into old shards), and
- a rerun whose listing or options differ from the record refuses before writing anything, saying
  what changed (inputs added, removed, changed in size) and what to do.
"""
from __future__ import annotations

import gzip
import json
import os
from dataclasses import dataclass, field
from typing import Iterator, Optional

from distssl.storage import store

RECORD_NAME = "build.json"
FORMAT = "distssl.build/1"


@dataclass
class SetPlan:
    """One set's part of one generation."""
    shards: list[list[int]]  # per shard, indices into the generation's inputs
    first_shard: int = 0  # shard numbers and sample keys continue after the earlier generations'
    first_key: int = 0
    failures: list[dict] = field(default_factory=list)  # dropped before writing (bad label candidates, duplicates)

    @property
    def planned(self) -> int:
        return sum(len(s) for s in self.shards)


@dataclass
class Generation:
    rels: list[str]
    sizes: list[int]
    labels: list[int]  # index into the record's class names, -1 = none
    shas: list[Optional[str]]  # sha256 of the input's bytes, when the plan needed it
    sets: dict[str, SetPlan]
    removed: list[str] = field(default_factory=list)  # earlier inputs gone from the source at this generation
    changed: list[str] = field(default_factory=list)  # earlier inputs whose listed size changed (re-added)

    def to_json(self) -> dict:
        return {"inputs": [[r, s, lab, h] for r, s, lab, h in zip(self.rels, self.sizes, self.labels, self.shas)],
                "sets": {k: {"shards": p.shards, "first_shard": p.first_shard, "first_key": p.first_key,
                             "failures": p.failures} for k, p in self.sets.items()},
                "removed": self.removed, "changed": self.changed}

    @classmethod
    def from_json(cls, d: dict) -> "Generation":
        rows = d["inputs"]
        return cls([r[0] for r in rows], [int(r[1]) for r in rows], [int(r[2]) for r in rows],
                   [r[3] for r in rows],
                   {k: SetPlan(v["shards"], v["first_shard"], v["first_key"], v["failures"])
                    for k, v in d["sets"].items()},
                   list(d.get("removed", [])), list(d.get("changed", [])))


@dataclass
class Record:
    """build.json and the generations it lists. A generation is one file (``build-gNNN.json.gz``), or, for a
    partitioned listing (distssl.shards.partitions), one file per partition (``build-gNNN-pPPPPP.json.gz``),
    each a :class:`Generation` of that partition's inputs whose shards are numbered after the previous
    part's. Parts are read when iterated, one at a time: a record of 100M keys is never in memory whole."""
    source: str
    options: dict
    class_names: list[str]
    heads: list[dict] = field(default_factory=list)  # build.json's "generations"
    dst: Optional[str] = None

    @property
    def partitioned(self) -> bool:
        return any("parts" in h for h in self.heads)

    def part_entries(self, g: int) -> list[dict]:
        head = self.heads[g]
        return head["parts"] if "parts" in head else [{"file": head["file"]}]

    def parts(self, generations: Optional[range] = None) -> Iterator[tuple[int, Generation]]:
        """(generation, part) of every part, in order, each read when reached."""
        for g in generations if generations is not None else range(len(self.heads)):
            for entry in self.part_entries(g):
                yield g, Generation.from_json(store.read_json(store.join(self.dst, entry["file"]), _DAMAGED_RECORD,
                                                              gzipped=True))

    def offsets(self) -> dict[str, tuple[int, int]]:
        """Each set's next shard number and sample key (from the summaries, else from the parts)."""
        out: dict[str, tuple[int, int]] = {}
        for g in range(len(self.heads)):
            entries = self.part_entries(g)
            if all("sets" in e and all("first_shard" in v for v in e["sets"].values()) for e in entries):
                for e in entries:
                    for name, v in e["sets"].items():
                        out[name] = (v["first_shard"] + v["shards"], v["first_key"] + v["planned"])
                continue
            for _, part in self.parts(range(g, g + 1)):
                for name, plan in part.sets.items():
                    out[name] = (plan.first_shard + len(plan.shards), plan.first_key + plan.planned)
        return out


def normalise_source(src: str) -> str:
    """The source as recorded: credentials hidden, local paths absolute, no trailing slash."""
    src = str(src).rstrip("/")
    if "://" not in src:
        src = os.path.abspath(src)
    return store.redact(src)


_DAMAGED_RECORD = ("the build's plan cannot be read, so nothing was written: restore the file from a copy, or "
                   "build into a new destination (the shard sets already there still train as they are)")


def read_record(dst: str) -> Optional[Record]:
    try:
        head = store.read_json(store.join(dst, RECORD_NAME), _DAMAGED_RECORD)
    except FileNotFoundError:
        return None
    if head.get("format") != FORMAT:
        raise ValueError(f"{store.redact(dst)}/{RECORD_NAME}: unknown build record format {head.get('format')!r}")
    return Record(head["source"], head["options"], list(head["class_names"]), list(head["generations"]), dst)


def _part_name(g: int, p: int) -> str:
    return f"build-g{g:03d}-p{p:05d}.json.gz"


def _summary(gen: Generation) -> dict:
    return {"inputs": len(gen.rels), "removed": len(gen.removed),
            "sets": {k: {"first_shard": p.first_shard, "shards": len(p.shards), "first_key": p.first_key,
                         "planned": p.planned} for k, p in gen.sets.items()}}


def _write_gzip_json(url: str, d: dict) -> None:
    store.write_bytes(url, gzip.compress(json.dumps(d, separators=(",", ":")).encode(), mtime=0))  # same bytes


def _write_head(dst: str, record: Record) -> None:
    head = {"format": FORMAT, "source": record.source, "options": record.options,
            "class_names": record.class_names, "generations": record.heads}
    store.write_bytes(store.join(dst, RECORD_NAME), json.dumps(head, indent=1).encode())


def write_generation(dst: str, record: Record, parts: Iterator[Generation],
                     buckets: list[tuple[int, int]], digests: list[str]) -> dict:
    """Append a generation planned partition by partition: every part's file as it comes, then build.json,
    which is what makes it part of the record (so a build killed while planning has no generation, and plans
    it again). Returns its head. Records written before partitions existed (one ``file`` per generation)
    read as generations of one part."""
    g = len(record.heads)
    entries = []
    for p, part in enumerate(parts):
        _write_gzip_json(store.join(dst, _part_name(g, p)), part.to_json())
        entries.append({"file": _part_name(g, p), "buckets": list(buckets[p]), "digest": digests[p],
                        **_summary(part)})
    totals: dict[str, dict] = {}
    for e in entries:
        for k, v in e["sets"].items():
            t = totals.setdefault(k, {"shards": 0, "planned": 0})
            t["shards"] += v["shards"]
            t["planned"] += v["planned"]
    head = {"parts": entries, "inputs": sum(e["inputs"] for e in entries),
            "removed": sum(e["removed"] for e in entries), "sets": totals}
    record.heads.append(head)
    record.dst = dst
    _write_head(dst, record)
    return head


@dataclass
class Diff:
    added: list[str]
    removed: list[str]
    changed: list[str]

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.changed)

    def describe(self) -> str:
        return (f"{len(self.added)} inputs added, {len(self.removed)} removed, "
                f"{len(self.changed)} changed in size")


def option_changes(recorded: dict, now: dict) -> list[str]:
    return [f"{k}: {recorded.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(recorded) | set(now))
            if recorded.get(k) != now.get(k)]
