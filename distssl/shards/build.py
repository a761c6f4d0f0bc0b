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
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Iterator, Optional

import numpy as np

from distssl.data.index import FORMAT, INDEX_NAME
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
from distssl.shards.splits import SplitOptions, set_order
from distssl.shards.writer import ShardJob, read_stats, run_job
from distssl.storage import store
from distssl.tracking.progress import bar as progress_bar

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


def input_url(base: str, rel: str) -> str:
    return rel if not base or "://" in rel or rel.startswith("/") else store.join(base, rel)


def set_url(dst: str, name: str) -> str:
    return store.join(dst, name) if name else dst


def is_labeled_set(name: str, options: dict) -> bool:
    return name != "unlabeled" and not options["unlabeled"]


def run_set_job(job: ShardJob) -> dict:
    """A shard job's stats, with the set it belongs to (shard names repeat from set to set)."""
    return {**run_job(job), "set_url": job.set_url}


def _part_jobs(dst: str, part, options: dict, base: str, image: ImageOptions) -> Iterator[tuple[str, ShardJob]]:
    """Every shard of one part of the record, (set name, job), as it planned them."""
    for name in set_order(part.sets):
        plan = part.sets[name]
        k = plan.first_key
        for n, members in enumerate(plan.shards):
            keys = [f"{k + j:09d}" for j in range(len(members))]
            k += len(members)
            yield name, ShardJob(set_url(dst, name), plan.first_shard + n, keys,
                                 [input_url(base, part.rels[i]) for i in members], [part.rels[i] for i in members],
                                 [part.labels[i] for i in members], is_labeled_set(name, options), image)


@dataclass
class SetTotals:
    """What a set's index needs of its shards' stats, summed as they come (no per-shard class counts kept:
    a 100M-key build has 100k shards)."""
    shards: list[dict] = field(default_factory=list)  # name, count, bytes
    hist: dict[int, int] = field(default_factory=dict)
    failures: list[dict] = field(default_factory=list)
    done: set = field(default_factory=set)

    def add(self, st: dict) -> None:
        if st["name"] in self.done:
            return
        self.done.add(st["name"])
        self.shards.append({"name": st["name"], "count": st["count"], "bytes": st["bytes"]})
        for k, v in st["class_counts"].items():
            self.hist[int(k)] = self.hist.get(int(k), 0) + v
        self.failures += st["failures"]


def _complete(dst: str, record: Record, base: str, image: ImageOptions, runner, progress: bool,
              generations: Optional[range] = None) -> dict[str, SetTotals]:
    """Write every shard of the record without stats, a part at a time (its jobs only in memory); returns
    each set's totals over all its shards."""
    planned: dict[str, int] = {}
    for head in record.heads:
        for name, v in head["sets"].items():
            planned[name] = planned.get(name, 0) + v["planned"]
    totals = {name: SetTotals() for name in set_order(planned)}
    bar = progress_bar(total=sum(planned.values()), desc="shards", unit="img", disable=not progress, dynamic_ncols=True)
    failed, written, t0 = 0, 0, time.time()
    for _, part in record.parts(generations):
        todo = []
        for name, job in _part_jobs(dst, part, record.options, base, image):
            st = read_stats(job.set_url, job.stats_name)  # complete shards are counted, not rewritten
            if st is None:
                todo.append((name, job))
            else:
                totals[name].add(st)
                bar.update(len(job.keys))
        set_of = {job.set_url: name for name, job in todo}
        for st in runner.unordered(run_set_job, [job for _, job in todo]):
            totals[set_of[st.pop("set_url")]].add(st)
            failed += len(st["failures"])
            written += st["count"] + len(st["failures"])
            bar.update(st["count"] + len(st["failures"]))
            bar.set_postfix(failed=failed, img_s=f"{written / max(1e-9, time.time() - t0):.0f}")
    bar.close()
    return totals


def _write_index(url: str, name: str, record: Record, totals: SetTotals, extra: dict) -> dict:
    planned = [f for _, part in record.parts() if name in part.sets for f in part.sets[name].failures]
    failures = planned + totals.failures
    hist = [0] * len(record.class_names)
    for k, v in totals.hist.items():
        hist[k] += v
    shards = sorted(totals.shards, key=lambda st: st["name"])
    reasons = _reason_counts(failures)
    index = {
        "format": FORMAT, "count": sum(st["count"] for st in shards), "labeled": is_labeled_set(name, record.options),
        "num_classes": len(record.class_names) or None, "class_names": record.class_names,
        "class_histogram": hist,
        "shards": shards,
        "bytes": sum(st["bytes"] for st in shards),
        "failures": failures, "num_failures": len(failures), "failure_reasons": reasons,
        "duplicates": reasons.get("duplicate", 0),
        "source": record.source, "seed": record.options["seed"], "max_count": record.options["max_count"],
        "generations": sum(name in head["sets"] for head in record.heads), **extra,
    }
    if failures:
        _write_if_changed(store.join(url, "failures.jsonl"),
                          "".join(json.dumps(f, sort_keys=True) + "\n" for f in failures).encode())
    _write_if_changed(store.join(url, INDEX_NAME), json.dumps(index, indent=1).encode())
    return index


def _reason_kind(reason: str) -> str:
    return "duplicate" if reason.startswith("duplicate of ") else reason.split(":", 1)[0]


def source_skipped(skipped: list[tuple[str, str]], listed: int = 100) -> dict:
    """What the source held that is not an input (files that are not images, links to nothing, files outside
    any class folder): counted by reason, the first ``listed`` named."""
    reasons: dict[str, int] = {}
    for _, why in skipped:
        reasons[why] = reasons.get(why, 0) + 1
    return {"count": len(skipped), "reasons": reasons, "files": [key for key, _ in skipped[:listed]]}


def _reason_counts(failures: list[dict]) -> dict[str, int]:
    out: dict[str, int] = {}
    for f in failures:
        kind = _reason_kind(f["reason"])
        out[kind] = out.get(kind, 0) + 1
    return dict(sorted(out.items()))


def _write_if_changed(url: str, body: bytes) -> None:
    """A rerun of a finished build leaves every object untouched."""
    try:
        if store.read_bytes(url) == body:
            return
    except FileNotFoundError:
        pass
    store.write_bytes(url, body)


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


def _written_hashes(dst: str, record: Record) -> Iterator[tuple[str, str]]:
    """(content hash, SET/KEY) of every written sample, eval first, then labeled, read from the shards'
    stats a shard at a time."""
    for wanted in set_order({name for head in record.heads for name in head["sets"]}):
        for _, part in record.parts():
            if wanted not in part.sets:
                continue
            for name, job in _part_jobs(dst, part, record.options, "", ImageOptions()):
                if name != wanted:
                    continue
                st = read_stats(job.set_url, job.stats_name) or {}
                for key, sha in st.get("samples", []):
                    yield sha, f"{name}/{key}" if name else key


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
        totals = _complete(dst, record, pl.base, opts.image, runner, opts.progress)
        if diff:  # --extend: the recorded plan is complete; now the new generation, then its shards
            _extend(dst, record, pl, diff, split, runner, work, opts.partition_keys)
            totals = _complete(dst, record, pl.base, opts.image, runner, opts.progress)
            _report_removed(src, diff)
        if not any(st["count"] for t in totals.values() for st in t.shards):  # a set of nothing is no result
            first = next((f for t in totals.values() for f in t.failures), {})
            raise ValueError(f"{store.redact(src)}: none of its inputs could be written as an image (the first: "
                             f"{first.get('input')}: {first.get('reason')}); no index was written to "
                             f"{store.redact(dst)}. Check the paths (a manifest's relative paths are read from "
                             f"its own folder) and rerun")
        removed = _removed_by_set(record)
        out = {}
        for name in set_order(totals):
            extra = {"removed_inputs": removed.get(name, 0), "source_skipped": source_skipped(pl.skipped)}
            if name == "unlabeled":
                extra["includes_labeled"] = record.options["labeled_in_unlabeled"]
            out[name] = _write_index(set_url(dst, name), name, record, totals[name], extra)
        return out
    finally:
        runner.close()


def _extend(dst: str, record: Record, pl: PartitionedListing, diff, split: SplitOptions, runner, work: str,
            partition_keys: int) -> None:
    """The next generation: the inputs the source gained (or that changed), their duplicates of what is
    written already dropped, planned after the existing shards; the labeled split is never touched."""
    new = _added(pl, diff, work, partition_keys)
    planner = Planner(new, split, os.path.join(work, "plan"), _verifier(runner), _hasher(runner),
                      generation=len(record.heads), offsets=record.offsets(), existing=_written_hashes(dst, record),
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


def _removed_by_set(record: Record) -> dict[str, int]:
    """How many samples of each set come from inputs since removed from the source."""
    gone = {r for _, part in record.parts() for r in part.removed}
    out: dict[str, int] = {}
    if not gone:
        return out
    for _, part in record.parts():
        for name, plan in part.sets.items():
            out[name] = out.get(name, 0) + sum(part.rels[i] in gone for shard in plan.shards for i in shard)
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
