"""Raw images -> shard sets: list the source, plan (or read the recorded plan), write shards, index.

Why the shape:
- The plan is a pure function of the listing, the options and the seed (distssl.shards.plan) and is
  recorded before any shard is written (distssl.shards.record). A rerun finishes the recorded plan;
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
import time
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np

from distssl.data import store
from distssl.data.index import FORMAT, INDEX_NAME
from distssl.shards.images import ImageOptions, process_image
from distssl.shards.inputs import read_input
from distssl.shards.listing import Listing, list_inputs
from distssl.shards.plan import SplitOptions, plan_extension, plan_first, set_order
from distssl.shards.record import (
    RECORD_NAME,
    Record,
    diff_listing,
    normalise_source,
    option_changes,
    read_record,
    write_generation,
)
from distssl.shards.runners import make_runner
from distssl.shards.writer import ShardJob, read_stats, run_job

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
    dry_run: bool = False
    progress: bool = True

    def check(self) -> None:
        if self.max_count < 1:
            raise ValueError("--max-count must be >= 1")
        if self.min_shards < 1:
            raise ValueError("--min-shards must be >= 1")
        if self.max_shard_bytes is not None and self.max_shard_bytes < 1:
            raise ValueError("--max-shard-bytes must be >= 1")
        if self.labels_per_class is not None and self.label_fraction is not None:
            raise ValueError("give --labels-per-class or --label-fraction, not both")
        if self.labels_per_class is not None and self.labels_per_class < 1:
            raise ValueError("--labels-per-class must be >= 1")
        for name in ("label_fraction", "eval_fraction"):
            v = getattr(self, name)
            if v is not None and not 0 < v < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be between 0 and 1 (exclusive)")
        if self.unlabeled and (self.labels_per_class or self.label_fraction or self.eval_fraction):
            raise ValueError("label and eval splits need classes: they cannot be combined with --unlabeled")
        if self.workers < 1:
            raise ValueError("--workers must be >= 1")
        if self.image.format not in (None, "jpg", "png", "webp"):
            raise ValueError("--format must be jpg, png or webp")
        if self.image.max_size is not None and self.image.max_size < 8:
            raise ValueError("--max-size must be >= 8 pixels")

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


def _jobs(dst: str, record: Record, base: str, image: ImageOptions) -> dict[str, list[ShardJob]]:
    """Every shard of every generation, by set, as the record planned it."""
    out: dict[str, list[ShardJob]] = {}
    for gen in record.generations:
        for name, plan in gen.sets.items():
            k = plan.first_key
            for n, members in enumerate(plan.shards):
                keys = [f"{k + j:09d}" for j in range(len(members))]
                k += len(members)
                out.setdefault(name, []).append(ShardJob(
                    set_url(dst, name), plan.first_shard + n, keys, [input_url(base, gen.rels[i]) for i in members],
                    [gen.rels[i] for i in members], [gen.labels[i] for i in members],
                    is_labeled_set(name, record.options), image))
    return out


def _complete(jobs: dict[str, list[ShardJob]], runner, progress: bool,
              known: Optional[dict[str, dict[str, dict]]] = None) -> dict[str, dict[str, dict]]:
    """Write every shard without stats; returns the stats of all shards, by set and shard name
    (``known``: stats already read, not read again)."""
    from tqdm import tqdm

    out: dict[str, dict[str, dict]] = {}
    for name in set_order(jobs):
        stats, todo, failed, t0 = {}, [], 0, time.time()
        label = name or "set"
        bar = tqdm(total=sum(len(j.keys) for j in jobs[name]), desc=f"shards {label}", unit="img",
                   disable=not progress, dynamic_ncols=True)
        for job in jobs[name]:  # complete shards (stats present) are counted, not rewritten
            st = (known or {}).get(name, {}).get(job.name) or read_stats(job.set_url, job.stats_name)
            if st is None:
                todo.append(job)
            else:
                stats[job.name] = st
                bar.update(len(job.keys))
        for st in runner.unordered(run_job, todo):
            stats[st["name"]] = st
            failed += len(st["failures"])
            bar.update(st["count"] + len(st["failures"]))
            bar.set_postfix(failed=failed, img_s=f"{bar.n / max(1e-9, time.time() - t0):.0f}")
        bar.close()
        out[name] = stats
    return out


def _write_index(url: str, name: str, record: Record, jobs: list[ShardJob], stats: dict[str, dict],
                 extra: dict) -> dict:
    ordered = [stats[j.name] for j in jobs]
    planned = [f for gen in record.generations if name in gen.sets for f in gen.sets[name].failures]
    failures = planned + [f for st in ordered for f in st["failures"]]
    hist = [0] * len(record.class_names)
    for st in ordered:
        for k, v in st["class_counts"].items():
            hist[int(k)] += v
    reasons = _reason_counts(failures)
    index = {
        "format": FORMAT, "count": sum(st["count"] for st in ordered), "labeled": is_labeled_set(name, record.options),
        "num_classes": len(record.class_names) or None, "class_names": record.class_names,
        "class_histogram": hist,
        "shards": [{"name": st["name"], "count": st["count"], "bytes": st["bytes"]} for st in ordered],
        "bytes": sum(st["bytes"] for st in ordered),
        "failures": failures, "num_failures": len(failures), "failure_reasons": reasons,
        "duplicates": reasons.get("duplicate", 0),
        "source": record.source, "seed": record.options["seed"], "max_count": record.options["max_count"],
        "generations": sum(name in gen.sets for gen in record.generations), **extra,
    }
    if failures:
        _write_if_changed(store.join(url, "failures.jsonl"),
                          "".join(json.dumps(f, sort_keys=True) + "\n" for f in failures).encode())
    _write_if_changed(store.join(url, INDEX_NAME), json.dumps(index, indent=1).encode())
    return index


def _reason_kind(reason: str) -> str:
    return "duplicate" if reason.startswith("duplicate of ") else reason.split(":", 1)[0]


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


def _labels_in_record_order(record: Record, listing: Listing, dst: str) -> None:
    """Class ids as the record numbered them (a class folder that disappeared must not shift them)."""
    if not record.class_names and not listing.class_names:
        return
    ids = {c: k for k, c in enumerate(record.class_names)}
    new = [c for c in listing.class_names if c not in ids]
    if new:
        raise ValueError(f"{store.redact(dst)}: the source has classes the build does not know ({', '.join(new[:5])}"
                         f"{' ...' if len(new) > 5 else ''}); a build's classes are fixed, so nothing was written. "
                         f"Build into a new destination")
    remap = np.asarray([ids[c] for c in listing.class_names], dtype=np.int64)
    listing.labels = np.where(listing.labels >= 0, remap[np.maximum(listing.labels, 0)], -1)
    listing.class_names = list(record.class_names)


def _check_same_build(record: Record, source: str, opts: BuildOptions, dst: str) -> None:
    changes = option_changes(record.options, opts.plan_options())
    if record.source != source:
        changes.insert(0, f"source: {record.source} -> {source}")
    if changes:
        raise ValueError(f"{store.redact(dst)} was built with other options: {'; '.join(changes)}. Nothing was "
                         f"written. Rerun with the options it was built with (see its {RECORD_NAME}), or give "
                         f"a new destination")


def _existing_hashes(stats: dict[str, dict[str, dict]]) -> dict[str, str]:
    """Content hash -> SET/KEY of every written sample, eval first, then labeled."""
    out: dict[str, str] = {}
    for name in set_order(stats):
        for st in stats[name].values():
            for key, sha in st.get("samples", []):
                out.setdefault(sha, f"{name}/{key}" if name else key)
    return out


def _offsets(record: Record) -> dict[str, tuple[int, int]]:
    """Each set's next shard number and sample key."""
    out: dict[str, tuple[int, int]] = {}
    for gen in record.generations:
        for name, plan in gen.sets.items():
            out[name] = (plan.first_shard + len(plan.shards), plan.first_key + plan.planned)
    return out


def _sub_listing(listing: Listing, rels: list[str]) -> Listing:
    pos = {r: i for i, r in enumerate(listing.rels)}
    take = np.asarray([pos[r] for r in rels], dtype=np.int64)
    return Listing(listing.base, list(rels), listing.labels[take] if len(take) else listing.labels[:0],
                   listing.sizes[take] if len(take) else listing.sizes[:0], listing.class_names)


def make_shards(src: str, dst: str, opts: Optional[BuildOptions] = None, **kw) -> dict[str, dict]:
    """Build DST, or DST/{labeled,unlabeled[,eval]} with a label split. Returns the indexes by set."""
    opts = opts or BuildOptions(**kw)
    opts.check()
    store.check_bucket(dst)
    listing = list_inputs(src, opts.unlabeled)
    if len(listing) == 0:
        raise ValueError(f"{store.redact(src)}: no images found")
    warn_split_folders(src, listing.class_names)
    source, split = normalise_source(src), opts.split()
    record = read_record(dst)
    if record is None:
        _refuse_unrecorded(dst)
    else:
        _check_same_build(record, source, opts, dst)
        _labels_in_record_order(record, listing, dst)
    diff = diff_listing(record, listing.rels, listing.sizes) if record else None
    if diff and not opts.extend:
        raise ValueError(
            f"{store.redact(src)} has changed since {store.redact(dst)} was planned: {diff.describe()}. Nothing was "
            f"written. To add the new inputs as new shards (existing shards and the labeled split stay as they "
            f"are), rerun with --extend; to build from the new listing, give a new destination")
    runner = None
    try:
        if record is None:
            if opts.dry_run:
                gen = plan_first(listing, split, lambda ids: [None] * len(ids), None)
                return {name: _plan_summary(listing, plan) for name, plan in gen.sets.items()}
            runner = make_runner(opts.workers, opts.ray_address, dst)
            verify = lambda ids: runner.map(_verify_one, [listing.url(i) for i in ids])  # noqa: E731
            hashes = runner.map(_hash_one, [listing.url(i) for i in range(len(listing))]) if opts.dedup else None
            record = Record(source, opts.plan_options(), list(listing.class_names))
            write_generation(dst, record, plan_first(listing, split, verify, hashes))
        elif opts.dry_run:
            new = _sub_listing(listing, diff.added + diff.changed) if diff else _sub_listing(listing, [])
            gen = plan_extension(new, split, len(record.generations), _offsets(record), None, {}, [], [])
            return {name: _plan_summary(new, plan) for name, plan in gen.sets.items()}
        runner = runner or make_runner(opts.workers, opts.ray_address, dst)
        stats = _complete(_jobs(dst, record, listing.base, opts.image), runner, opts.progress)
        if diff:  # --extend: the recorded plan is complete; now the new generation
            new = _sub_listing(listing, diff.added + diff.changed)
            hashes = runner.map(_hash_one, [new.url(i) for i in range(len(new))])
            gen = plan_extension(new, split, len(record.generations), _offsets(record), hashes,
                                 _existing_hashes(stats), diff.removed, diff.changed)
            write_generation(dst, record, gen)
            stats = _complete(_jobs(dst, record, listing.base, opts.image), runner, opts.progress, known=stats)
            _report_removed(src, diff)
        jobs = _jobs(dst, record, listing.base, opts.image)
        removed = _removed_by_set(record)
        out = {}
        for name in set_order(jobs):
            extra = {"removed_inputs": removed.get(name, 0)}
            if name == "unlabeled":
                extra["includes_labeled"] = record.options["labeled_in_unlabeled"]
            out[name] = _write_index(set_url(dst, name), name, record, jobs[name], stats.get(name, {}), extra)
        return out
    finally:
        if runner is not None:
            runner.close()


def _removed_by_set(record: Record) -> dict[str, int]:
    """How many samples of each set come from inputs since removed from the source."""
    gone = {r for gen in record.generations for r in gen.removed}
    out: dict[str, int] = {}
    for gen in record.generations:
        for name, plan in gen.sets.items():
            out[name] = out.get(name, 0) + sum(gen.rels[i] in gone for shard in plan.shards for i in shard)
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
