"""Raw images -> shard sets: list the source, plan (or read the recorded plan), write shards, index.

Why the shape:
- Every source is listed into partitions (one for a small bucket) and planned, recorded and written by the
  same functions. The plan is a pure function of the listing, the options and the seed (distssl.shards.plan) and is
  recorded before any shard is written (distssl.shards.build_record). A rerun finishes the recorded plan;
  one whose listing or options changed refuses before writing anything; ``extend`` adds the new
  inputs as a new generation of shards after the existing ones.
- A shard is complete when its stats exist (distssl.shards.writer), so a rerun writes only the
  missing shards, wherever the jobs run (distssl.shards.runners: processes or a Ray cluster).
- ``index.json`` is written last, from every shard's stats: a shard set without it is incomplete,
  and one with it lists only complete shards (an extension in progress is invisible to readers).
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np

from distssl.data.index import INDEX_NAME
from distssl.errors import OptionError
from distssl.shards.build_record import (
    RECORD_NAME,
    Record,
    normalise_source,
    option_changes,
    read_record,
    write_generation,
)
from distssl.shards.images import ImageOptions, process_image
from distssl.shards.inputs import read_input
from distssl.shards.listing import Listing
from distssl.shards.partitions import PartitionedListing, diff_listing, from_listing, list_partitioned
from distssl.shards.plan import Planner
from distssl.shards.runners import make_runner
from distssl.shards.set_writer import complete, removed_by_set, set_url, source_skipped, write_index, written_hashes
from distssl.shards.splits import SplitOptions, set_order
from distssl.storage import store

log = logging.getLogger(__name__)


@dataclass
class BuildOptions:
    labels_per_class: Optional[int] = None
    label_fraction: Optional[float] = None
    eval_fraction: Optional[float] = None
    unlabeled: bool = False
    # the unlabeled set holds every good training image, the labeled ones included, as FixMatch's
    # reference does (its unlabeled split is the whole train split); False leaves them out
    labeled_in_unlabeled: bool = True
    seed: int = 0
    max_count: int = 1000
    max_shard_bytes: Optional[int] = None
    min_shards: int = 1  # every set in at least this many shards (when it has that many images)
    image: ImageOptions = ImageOptions()
    dedup: bool = False  # exact duplicates (same bytes) keep one copy: eval's, else labeled's, else the first
    extend: bool = False  # add the source's new inputs to a finished (or unfinished) build
    workers: int = 1
    ray_address: Optional[str] = None  # run the shard jobs as tasks on this Ray cluster ("auto", HOST:PORT)
    # listings of more keys are listed, planned and recorded in partitions of about this many keys (by a hash
    # of the key): no process holds more than one partition's (distssl.shards.partitions)
    partition_keys: int = 500_000
    dry_run: bool = False
    progress: bool = True

    def check(self) -> None:
        """Every option in range, or an OptionError naming it (the command spells it as its flag)."""
        for name in ("max_count", "min_shards", "max_shard_bytes", "labels_per_class", "workers", "partition_keys"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise OptionError(name, "{0} must be >= 1")
        if self.labels_per_class is not None and self.label_fraction is not None:
            raise OptionError(("labels_per_class", "label_fraction"), "give {0} or {1}, not both")
        for name in ("label_fraction", "eval_fraction"):
            v = getattr(self, name)
            if v is not None and not 0 < v < 1:
                raise OptionError(name, "{0} must be between 0 and 1 (exclusive)")
        if self.unlabeled and (self.labels_per_class or self.label_fraction or self.eval_fraction):
            raise OptionError("unlabeled", "label and eval splits need classes: they cannot be combined with {0}")
        if self.image.format not in (None, "jpg", "png", "webp"):
            raise OptionError("format", "{0} must be jpg, png or webp")
        if self.image.max_size is not None and self.image.max_size < 8:
            raise OptionError("max_size", "{0} must be >= 8 pixels")

    def split(self) -> SplitOptions:
        return SplitOptions(self.labels_per_class, self.label_fraction, self.eval_fraction, self.unlabeled,
                            self.labeled_in_unlabeled, self.seed, self.max_count, self.max_shard_bytes, self.dedup,
                            self.min_shards)

    def plan_options(self) -> dict:
        """The options that shape the plan (recorded; a rerun must give the same)."""
        split = asdict(self.split())
        if split["min_shards"] == 1:  # as builds recorded before the option existed
            split.pop("min_shards")
        return {**split, "image": asdict(self.image)}


def _verify_one(url: str) -> Optional[str]:
    try:
        data = read_input(url)
    except Exception as e:
        return f"unreadable: {type(e).__name__}: {e}"
    return process_image(data, ImageOptions())[2]


def _hash_one(url: str) -> tuple[Optional[str], Optional[str]]:
    """(sha256 of the input's bytes, None), or (None, why) when it cannot be read."""
    try:
        return hashlib.sha256(read_input(url)).hexdigest(), None
    except (FileNotFoundError, PermissionError, IsADirectoryError) as e:
        return None, f"unreadable: {type(e).__name__}: {e}"


SPLIT_NAMES = {"train", "training", "val", "valid", "validation", "eval", "evaluation", "test", "testing", "dev"}


def warn_split_folders(src: str, class_names: list[str]) -> list[str]:
    """Class folders named like splits (train/, eval/) mean SRC is one level too high: say so."""
    splits = [n for n in class_names if n.lower() in SPLIT_NAMES]
    if len(splits) >= 2:
        where = store.redact(src).rstrip("/")
        log.warning("%s: the class folders %s look like split folders, not classes; if they are splits, build "
                    "each on its own (e.g. %s/%s)", where, ", ".join(splits), where, splits[0])
    return splits




def _refuse_unrecorded(dst: str) -> None:
    """Shards without a build record: their plan is unknown, so nothing may be added to them."""
    fs, root = store.filesystem(dst)
    root = root.rstrip("/")
    found = [p for pattern in ("*.stats.json", "*/*.stats.json", INDEX_NAME, f"*/{INDEX_NAME}")
             for p in fs.glob(f"{root}/{pattern}")]
    if found:
        raise ValueError(f"{store.redact(dst)} already holds shards but no {RECORD_NAME} (built by an older distssl, "
                         f"or by hand): their plan is unknown, so nothing was written. Build into a new destination")


def _classes_in_record_order(record: Record, pl: PartitionedListing, dst: str) -> None:
    """Class ids as the record numbered them (a class folder that disappeared must not shift them)."""
    if not record.class_names and not pl.class_names:
        return
    new = [c for c in pl.class_names if c not in set(record.class_names)]
    if new:
        raise ValueError(f"{store.redact(dst)}: the source has classes the build does not know ({', '.join(new[:5])}"
                         f"{' ...' if len(new) > 5 else ''}); a build's classes are fixed, so nothing was written. "
                         f"Build into a new destination")
    pl.set_class_names(record.class_names)


def _check_same_build(record: Record, source: str, opts: BuildOptions, dst: str) -> None:
    changes = option_changes(record.options, opts.plan_options())
    if record.source != source:
        changes.insert(0, f"source: {record.source} -> {source}")
    if changes:
        raise ValueError(f"{store.redact(dst)} was built with other options: {'; '.join(changes)}. Nothing was "
                         f"written. Rerun with the options it was built with (see its {RECORD_NAME}), or give "
                         f"a new destination")


def make_shards(src: str, dst: str, opts: Optional[BuildOptions] = None, **kw) -> dict[str, dict]:
    """Build DST, or DST/{labeled,unlabeled[,eval]} with a label split. Returns the indexes by set."""
    opts = opts or BuildOptions(**kw)
    opts.check()
    store.check_bucket(dst)
    work = tempfile.mkdtemp(prefix="distssl-build-")  # the listing's partitions, on local disk
    try:
        return _build(src, dst, opts, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _build(src: str, dst: str, opts: BuildOptions, work: str) -> dict[str, dict]:
    pl = list_partitioned(src, os.path.join(work, "listing"), opts.partition_keys, opts.unlabeled)
    if len(pl) == 0:
        raise ValueError(f"{store.redact(src)}: no images found")
    warn_split_folders(src, pl.class_names)
    source, split = normalise_source(src), opts.split()
    record = read_record(dst)
    if record is None:
        _refuse_unrecorded(dst)
    else:
        _check_same_build(record, source, opts, dst)
        _classes_in_record_order(record, pl, dst)
    diff = None if record is None else diff_listing(record, pl, os.path.join(work, "diff"))
    if diff and not opts.extend:
        raise ValueError(
            f"{store.redact(src)} has changed since {store.redact(dst)} was planned: {diff.describe()}. Nothing was "
            f"written. To add the new inputs as new shards (existing shards and the labeled split stay as they "
            f"are), rerun with --extend; to build from the new listing, give a new destination")
    if opts.dry_run:
        return _dry_run(pl, record, diff, split, work, opts)
    runner = make_runner(opts.workers, opts.ray_address, dst)
    try:
        if record is None:
            record = Record(source, opts.plan_options(), list(pl.class_names))
            planner = Planner(pl, split, os.path.join(work, "plan"), _verifier(runner),
                              _hasher(runner) if opts.dedup else None)
            write_generation(dst, record, planner.plan(), pl.ranges, pl.digests)
        totals = complete(dst, record, pl.base, opts.image, runner, opts.progress)
        if diff:  # --extend: the recorded plan is complete; now the new generation, then its shards
            _extend(dst, record, pl, diff, split, runner, work, opts.partition_keys)
            totals = complete(dst, record, pl.base, opts.image, runner, opts.progress)
            _report_removed(src, diff)
        if not any(st["count"] for t in totals.values() for st in t.shards):  # a set of nothing is no result
            first = next((f for t in totals.values() for f in t.failures), {})
            raise ValueError(f"{store.redact(src)}: none of its inputs could be written as an image (the first: "
                             f"{first.get('input')}: {first.get('reason')}); no index was written to "
                             f"{store.redact(dst)}. Check the paths (a manifest's relative paths are read from "
                             f"its own folder) and rerun")
        removed = removed_by_set(record)
        out = {}
        for name in set_order(totals):
            extra = {"removed_inputs": removed.get(name, 0), "source_skipped": source_skipped(pl.skipped)}
            if name == "unlabeled":
                extra["includes_labeled"] = record.options["labeled_in_unlabeled"]
            out[name] = write_index(set_url(dst, name), name, record, totals[name], extra)
        return out
    finally:
        runner.close()


def _extend(dst: str, record: Record, pl: PartitionedListing, diff, split: SplitOptions, runner, work: str,
            partition_keys: int) -> None:
    """The next generation: the inputs the source gained (or that changed), their duplicates of what is
    written already dropped, planned after the existing shards; the labeled split is never touched."""
    new = _added(pl, diff, work, partition_keys)
    planner = Planner(new, split, os.path.join(work, "plan"), _verifier(runner), _hasher(runner),
                      generation=len(record.heads), offsets=record.offsets(), existing=written_hashes(dst, record),
                      removed=diff.removed, changed=diff.changed)
    write_generation(dst, record, planner.plan(), new.ranges, new.digests)


def _verifier(runner):
    """Candidates checked as images: (partition, ids) -> reasons."""
    return lambda part, ids: runner.map(_verify_one, [part.url(i) for i in ids])


def _hasher(runner):
    return lambda part: runner.map(_hash_one, [part.url(i) for i in range(len(part))])


def _added(pl: PartitionedListing, diff, work: str, partition_keys: int) -> PartitionedListing:
    """The inputs an extension adds (new, or changed in size), partitioned like any listing."""
    wanted = set(diff.added) | set(diff.changed)
    rels, sizes, labels = [], [], []
    for part in (pl.load(p) for p in range(pl.partitions)):
        for i, rel in enumerate(part.rels):
            if rel in wanted:
                rels.append(rel)
                sizes.append(int(part.sizes[i]))
                labels.append(int(part.labels[i]))
    new = Listing(pl.base, rels, np.asarray(labels, dtype=np.int64), np.asarray(sizes, dtype=np.int64),
                  list(pl.class_names))
    return from_listing(new, os.path.join(work, "added"), partition_keys)


def _dry_run(pl: PartitionedListing, record: Optional[Record], diff, split: SplitOptions, work: str,
             opts: BuildOptions) -> dict[str, dict]:
    """What the build would plan, per set, writing nothing (no image read: every candidate taken as good)."""
    if record is not None and not diff:
        return {}
    if record is not None:
        pl = _added(pl, diff, work, opts.partition_keys)
    planner = Planner(pl, split, os.path.join(work, "plan"), lambda part, ids: [None] * len(ids),
                      generation=len(record.heads) if record else 0, offsets=record.offsets() if record else None)
    out: dict[str, dict] = {}
    for p, part in enumerate(planner.plan()):
        for name, plan in part.sets.items():
            summary = _plan_summary(pl.load(p), plan)
            o = out.setdefault(name, {"count": 0, "shards": [], "listed_bytes": 0, "num_failures": 0,
                                      "dry_run": True})
            o["count"] += summary["count"]
            o["shards"] += summary["shards"]
            o["listed_bytes"] += summary["listed_bytes"]
    return out


def _report_removed(src: str, diff) -> None:
    if diff.removed or diff.changed:
        log.warning("%s: %d inputs of the build are gone from the source and %d changed in size; their samples stay "
                    "in the shards (listed in the build record; rebuild into a new destination to drop them)%s",
                    store.redact(src), len(diff.removed), len(diff.changed),
                    f", e.g. {(diff.removed or diff.changed)[0]}")


def _plan_summary(listing: Listing, plan) -> dict:
    members = [i for shard in plan.shards for i in shard]
    return {"count": len(members), "shards": [{"count": len(s)} for s in plan.shards],
            "listed_bytes": int(listing.sizes[members].sum()) if members else 0, "num_failures": 0, "dry_run": True}


def is_complete(dst: str) -> bool:
    return store.exists(store.join(dst, INDEX_NAME))
