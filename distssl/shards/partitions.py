"""A listing too large for one process, held on disk in partitions by a hash of the key.

As the source is listed (``listing.source_rows``: a folder directory by directory, a manifest a line or
row group at a time), each key goes to one of ``BUCKETS`` hash buckets (crc32 of the key, the same on
every machine and run), spilled to a work folder; nothing but the per-bucket counts and the class names
stays in memory. Partitions are runs of consecutive buckets of at most ``partition_keys`` keys, and a
partition is loaded as an ordinary :class:`~distssl.shards.listing.Listing` (sorted by key), so the
planner works on one partition at a time: memory follows the partition size, not the bucket's.
A pass after the listing counts each partition's classes and fingerprints it (sha256 of its sorted keys
and sizes), which is what the build record keeps to tell an unchanged partition on a rerun.
"""
from __future__ import annotations

import hashlib
import json
import os
import zlib
from dataclasses import dataclass, field
from typing import Iterator, Optional

import numpy as np

from distssl.shards.build_record import Diff
from distssl.shards.listing import Listing, Rows, class_order, no_class_folders, source_rows

BUCKETS = 4096
FLUSH_ROWS = 200_000  # rows buffered in memory before they are appended to their bucket files


def bucket_of(rel: str) -> int:
    return zlib.crc32(rel.encode("utf-8", "surrogateescape")) % BUCKETS


def _line(seq: int, rel: str, size: int, label: Optional[str]) -> str:
    """One listed input as a line of its bucket file: its place in the listing, size, label text, key."""
    if any(c in rel or (label and c in label) for c in "\t\n\\\x00"):
        return "\x00" + json.dumps([seq, rel, size, label]) + "\n"
    return f"{seq}\t{size}\t{label if label is not None else ''}\t{rel}\n"


def _parse(line: str) -> tuple[int, str, int, Optional[str]]:
    if line.startswith("\x00"):
        seq, rel, size, label = json.loads(line[1:])
        return int(seq), rel, int(size), label
    seq, size, label, rel = line.rstrip("\n").split("\t", 3)
    return int(seq), rel, int(size), label or None


class Spill:
    """Lines by hash bucket, in ``FILES`` files of consecutive buckets kept open while written (a file per
    bucket cost an open per bucket per flush: 0.4 ms each on an overlay disk); each line starts with its
    bucket, so a run of buckets reads only the files that hold it."""

    FILES = 64

    def __init__(self, folder: str, name: str = "b"):
        self.folder, self.name = folder, name
        os.makedirs(folder, exist_ok=True)
        self.buffers: list[list[str]] = [[] for _ in range(self.FILES)]
        self.buffered = 0
        self.counts = np.zeros(BUCKETS, dtype=np.int64)
        self.files: dict[int, object] = {}

    def path(self, f: int) -> str:
        return os.path.join(self.folder, f"{self.name}{f:02d}.txt")

    def add(self, bucket: int, line: str) -> None:
        self.buffers[bucket * self.FILES // BUCKETS].append(f"{bucket}\t{line}")
        self.counts[bucket] += 1
        self.buffered += 1
        if self.buffered >= FLUSH_ROWS:
            self._write()

    def _write(self) -> None:
        for f, lines in enumerate(self.buffers):
            if lines:
                if f not in self.files:
                    self.files[f] = open(self.path(f), "a", encoding="utf-8", errors="surrogateescape")
                self.files[f].writelines(lines)
                lines.clear()
        self.buffered = 0

    def flush(self) -> None:
        """Everything written and the files closed: the spill is ready to read."""
        self._write()
        for fh in self.files.values():
            fh.close()
        self.files = {}

    def table(self, b0: int, b1: int):
        """The listing lines of buckets [b0, b1) as a pyarrow table (seq, size, label, rel)."""
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.csv as pacsv

        odd: list[str] = []  # lines JSON-escaped for a tab, newline or backslash in the key: parsed here

        def escaped(row) -> str:
            odd.append(row.text)
            return "skip"

        names = ["b", "seq", "size", "label", "rel"]
        types = {"b": pa.int32(), "seq": pa.int64(), "size": pa.int64(), "label": pa.string(), "rel": pa.string()}
        parts = []
        # use_threads=False: the reader's pool threads outlived the build and, torn down at exit, aborted
        # the process now and then ('terminate called without an active exception', exit -6: apache/arrow
        # #34314); the builder's parallelism is its writer processes, not this read
        for f in range(b0 * self.FILES // BUCKETS, (b1 - 1) * self.FILES // BUCKETS + 1):
            if not os.path.exists(self.path(f)) or os.path.getsize(self.path(f)) == 0:
                continue
            t = pacsv.read_csv(self.path(f), read_options=pacsv.ReadOptions(column_names=names, use_threads=False),
                               parse_options=pacsv.ParseOptions(delimiter="\t", quote_char=False, escape_char=False,
                                                                invalid_row_handler=escaped),
                               convert_options=pacsv.ConvertOptions(column_types=types, null_values=[""],
                                                                    strings_can_be_null=True))
            parts.append(t.filter(pc.and_(pc.greater_equal(t["b"], b0), pc.less(t["b"], b1))))
        rows = [(int(b), *_parse(line)) for b, line in (text.split("\t", 1) for text in odd)]
        rows = [r for r in rows if b0 <= r[0] < b1]
        if rows or not parts:
            parts.append(pa.table({"b": pa.array([r[0] for r in rows], pa.int32()),
                                   "seq": pa.array([r[1] for r in rows], pa.int64()),
                                   "size": pa.array([r[3] for r in rows], pa.int64()),
                                   "label": pa.array([r[4] for r in rows], pa.string()),
                                   "rel": pa.array([r[2] for r in rows], pa.string())}))
        return pa.concat_tables(parts).drop_columns(["b"])

    def lines(self, b0: int, b1: Optional[int] = None) -> Iterator[tuple[int, str]]:
        """(bucket, line) of the buckets in [b0, b1) (b1 = b0 + 1 by default), file by file."""
        b1 = b0 + 1 if b1 is None else b1
        for f in range(b0 * self.FILES // BUCKETS, (b1 - 1) * self.FILES // BUCKETS + 1):
            if not os.path.exists(self.path(f)):
                continue
            with open(self.path(f), encoding="utf-8", errors="surrogateescape") as fh:
                for raw in fh:
                    bucket, line = raw.split("\t", 1)
                    if b0 <= int(bucket) < b1:
                        yield int(bucket), line


def group_buckets(counts: np.ndarray, partition_keys: int) -> list[tuple[int, int]]:
    """Consecutive bucket ranges [b0, b1) of at most ``partition_keys`` keys each (a bucket larger than that
    is a partition of its own): a pure function of the counts."""
    out, start, held = [], 0, 0
    for b, n in enumerate(counts.tolist()):
        if b > start and held + n > partition_keys:
            out.append((start, b))
            start, held = b, 0
        held += n
    out.append((start, len(counts)))
    return out


@dataclass
class PartitionedListing:
    """A source's listing on disk, by partition. ``class_counts[p, c]``: images of class c in partition p;
    ``digests[p]``: partition p's fingerprint."""
    base: str
    class_names: list[str]
    spill: Spill
    ranges: list[tuple[int, int]]
    class_counts: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), dtype=np.int64))
    digests: list[str] = field(default_factory=list)
    unlabeled: bool = False
    by_key: bool = True  # a partition's inputs sorted by key (folders), else in listing order (manifests)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (key, reason): files the listing passed over

    def __len__(self) -> int:
        return int(self.spill.counts.sum())

    @property
    def partitions(self) -> int:
        return len(self.ranges)

    def sizes(self) -> list[int]:
        return [int(self.spill.counts[b0:b1].sum()) for b0, b1 in self.ranges]

    def load(self, p: int) -> Listing:
        """Partition ``p`` as a Listing (sorted by key, or in the manifest's order), labels as ids into
        ``class_names``: a source of one partition loads as ``list_inputs`` lists it. Read with pyarrow's
        CSV reader, sorted and numbered in its kernels (a Python loop over the lines took 10 us a key)."""
        import pyarrow as pa
        import pyarrow.compute as pc

        b0, b1 = self.ranges[p]
        table = self.spill.table(b0, b1)
        table = table.take(pc.sort_indices(table, [("rel" if self.by_key else "seq", "ascending")]))
        if self.unlabeled or not self.class_names:
            labels = np.full(table.num_rows, -1, dtype=np.int64)
        else:
            ids = pc.index_in(table.column("label"), value_set=pa.array(self.class_names, pa.string()))
            labels = ids.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
        return Listing(self.base, table.column("rel").to_pylist(), labels,
                       table.column("size").to_numpy(zero_copy_only=False).astype(np.int64), list(self.class_names))

    def set_class_names(self, names: list[str]) -> None:
        """Number the classes as ``names`` does (a recorded build's order), and count them again."""
        self.class_names = list(names)
        self._count()

    def regroup(self, ranges: list[tuple[int, int]]) -> None:
        """Use these bucket ranges (a recorded build's) and count and fingerprint them again."""
        self.ranges = list(ranges)
        self._count()

    def _count(self) -> None:
        C = len(self.class_names)
        self.class_counts = np.zeros((len(self.ranges), C), dtype=np.int64)
        self.digests = []
        for p in range(len(self.ranges)):
            part = self.load(p)
            if C and len(part):
                known = part.labels[part.labels >= 0]
                self.class_counts[p] = np.bincount(known, minlength=C)
            self.digests.append(digest(part))


def digest(listing: Listing) -> str:
    """sha256 of a listing's keys and sizes, in key order (labels follow from the keys' folders or the record)."""
    h = hashlib.sha256()
    for rel, size in sorted(zip(listing.rels, listing.sizes.tolist())):
        h.update(f"{rel}\t{size}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def spill_rows(listed: Rows, folder: str, unlabeled: bool) -> tuple[Spill, set[str], int]:
    """Route every row into its bucket; (the spill, the class label texts seen, rows outside any class folder)."""
    spill = Spill(folder)
    names: set[str] = set()
    outside = 0
    for seq, (rel, size, label) in enumerate(listed.rows):
        if listed.by_folder and label is None and not unlabeled:
            outside += 1
            listed.skipped.append((rel, "outside any class folder"))
            continue
        if unlabeled:
            label = None
        elif label is not None:
            names.add(label)
        spill.add(bucket_of(rel), _line(seq, rel, size, label))
    spill.flush()
    return spill, names, outside


def list_partitioned(src: str, folder: str, partition_keys: int, unlabeled: bool = False,
                     ranges: Optional[list[tuple[int, int]]] = None) -> PartitionedListing:
    """List ``src`` into ``folder`` (a local work folder), partitioned by hash into runs of buckets of at most
    ``partition_keys`` keys, or into the given bucket ``ranges`` (a recorded build's)."""
    listed = source_rows(src)
    spill, names, outside = spill_rows(listed, folder, unlabeled)
    if listed.by_folder and not unlabeled and outside and not spill.counts.sum():
        raise no_class_folders(src)
    class_names = sorted(names) if listed.by_folder else class_order(names)
    out = PartitionedListing(listed.base, class_names, spill, [], unlabeled=unlabeled, by_key=listed.by_folder,
                             skipped=listed.skipped)
    out.regroup(ranges or group_buckets(spill.counts, partition_keys))
    return out


def from_listing(listing: Listing, folder: str, partition_keys: int,
                 ranges: Optional[list[tuple[int, int]]] = None) -> PartitionedListing:
    """An in-memory listing (e.g. the inputs an extension adds) partitioned the same way."""
    rows = ((rel, int(size), listing.class_names[lb] if lb >= 0 else None)
            for rel, size, lb in zip(listing.rels, listing.sizes.tolist(), listing.labels.tolist()))
    spill, _, _ = spill_rows(Rows(listing.base, rows, False), folder, unlabeled=False)
    out = PartitionedListing(listing.base, list(listing.class_names), spill, [], by_key=False)
    out.regroup(ranges or group_buckets(spill.counts, partition_keys))
    return out


def diff_listing(record, pl: PartitionedListing, folder: str):
    """What changed between a record and a listing, one hash bucket at a time: the record's inputs (every
    generation's, minus those a later one removed) are spilled to buckets as the listing was, and each
    bucket compared. Only the differences are held (their keys), never either side whole."""

    rec = Spill(folder, "r")
    for g, part in record.parts():
        for rel in part.removed:
            rec.add(bucket_of(rel), f"{g}\t-1\t{rel}\n")
        for rel, size in zip(part.rels, part.sizes):
            rec.add(bucket_of(rel), f"{g}\t{int(size)}\t{rel}\n")
    rec.flush()
    added, removed, changed = [], [], []
    per_file = BUCKETS // Spill.FILES
    for first in range(0, BUCKETS, per_file):  # a file's buckets at a time: each side's file read once
        known: dict[int, dict[str, int]] = {}
        for b, line in rec.lines(first, first + per_file):  # in generation order: a later word is the last
            _, size, rel = line.rstrip("\n").split("\t", 2)
            if int(size) < 0:
                known.setdefault(b, {}).pop(rel, None)
            else:
                known.setdefault(b, {})[rel] = int(size)
        now: dict[int, dict[str, int]] = {}
        for b, line in pl.spill.lines(first, first + per_file):
            _, rel, size, _ = _parse(line)
            now.setdefault(b, {})[rel] = size
        for b in set(known) | set(now):
            k, n = known.get(b, {}), now.get(b, {})
            added += [r for r in n if r not in k]
            removed += [r for r in k if r not in n]
            changed += [r for r, s in n.items() if r in k and s and k[r] and s != k[r]]
    return Diff(sorted(added), sorted(removed), sorted(changed))
