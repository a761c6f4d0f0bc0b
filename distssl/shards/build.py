"""Raw images -> shard sets: plan (a pure function of listing + seed), write shards in parallel, index.

Why the shape:
- The labeled split is drawn per class from a seeded permutation, verifying candidates as it goes,
  so a corrupt image never takes a labeled slot and the labeled count is exact; every other image
  is decoded exactly once, while its shard is written. The unlabeled set holds every good training
  image, the labeled ones included (FixMatch trains its unlabeled loss on the whole train split).
- Images are assigned to shards by a seeded shuffle of the sorted listing (shards mix classes), in
  chunks bounded by ``max_count`` and by listed bytes (``max_shard_bytes``); the same inputs and seed
  give the same shards, so a rerun skips the complete ones (those with stats) and changes nothing.
- ``index.json`` is written last, from the shards' stats: a shard set without it is incomplete.
"""
from __future__ import annotations

import json
import logging
import multiprocessing as mp
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from distssl.data import io
from distssl.data.index import FORMAT, INDEX_NAME
from distssl.shards.images import ImageOptions, process_image
from distssl.shards.listing import Listing, list_inputs
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
    image: ImageOptions = ImageOptions()
    workers: int = 1
    dry_run: bool = False
    progress: bool = True

    def check(self) -> None:
        if self.max_count < 1:
            raise ValueError("--max-count must be >= 1")
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


def _by_class(idx: np.ndarray, labels: np.ndarray) -> dict[int, np.ndarray]:
    return {int(c): idx[labels[idx] == c] for c in np.unique(labels[idx])}


def split_eval(listing: Listing, idx: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified, seeded: round(fraction x class size) of every class go to eval."""
    rng = np.random.default_rng([seed, 1])
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
                max_bytes: Optional[int]) -> list[np.ndarray]:
    order = np.random.default_rng([seed, 3]).permutation(idx) if len(idx) else idx
    shards, start, size = [], 0, 0
    for j, i in enumerate(order):
        s = int(listing.sizes[i])
        if j > start and (j - start >= max_count or (max_bytes and size + s > max_bytes)):
            shards.append(order[start:j])
            start, size = j, 0
        size += s
    if len(order) > start:
        shards.append(order[start:])
    return shards


def _verify_one(url: str) -> Optional[str]:
    try:
        data = io.read_bytes(url)
    except Exception as e:
        return f"unreadable: {type(e).__name__}: {e}"
    return process_image(data, ImageOptions())[2]


class _Runner:
    """Runs jobs inline (1 worker) or in spawned processes (fork is unsafe with s3fs' event loops)."""

    def __init__(self, workers: int):
        self.pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) if workers > 1 else None

    def map(self, fn, items: list) -> list:
        return list(self.pool.map(fn, items, chunksize=4)) if self.pool else [fn(x) for x in items]

    def unordered(self, fn, items: list):
        if not self.pool:
            for x in items:
                yield fn(x)
            return
        futures = [self.pool.submit(fn, x) for x in items]
        for fut in as_completed(futures):
            yield fut.result()

    def close(self):
        if self.pool:
            self.pool.shutdown(cancel_futures=True)


def write_set(set_url: str, listing: Listing, idx: np.ndarray, *, labeled: bool, opts: BuildOptions,
              extra_failures: list[dict], runner: _Runner, source: str, extra_index: Optional[dict] = None) -> dict:
    shards = plan_shards(listing, idx, opts.seed, opts.max_count, opts.max_shard_bytes)
    jobs, start = [], 0
    for n, members in enumerate(shards):
        keys = [f"{start + j:09d}" for j in range(len(members))]
        start += len(members)
        jobs.append(ShardJob(set_url, n, keys, [listing.url(int(i)) for i in members],
                             [listing.rels[int(i)] for i in members], [int(listing.labels[i]) for i in members],
                             labeled, opts.image))
    from tqdm import tqdm

    stats_by_name, failed, t0 = {}, 0, time.time()
    name = set_url.rstrip("/").rsplit("/", 1)[-1]
    bar = tqdm(total=len(idx), desc=f"shards {name}", unit="img", disable=not opts.progress, dynamic_ncols=True)
    todo = []
    for job in jobs:  # complete shards (stats present) are counted, not rewritten
        st = read_stats(set_url, job.stats_name)
        if st is None:
            todo.append(job)
        else:
            stats_by_name[job.name] = st
            bar.update(len(job.keys))
    for st in runner.unordered(run_job, todo):
        stats_by_name[st["name"]] = st
        failed += len(st["failures"])
        bar.update(st["count"] + len(st["failures"]))
        bar.set_postfix(failed=failed, img_s=f"{bar.n / max(1e-9, time.time() - t0):.0f}")
    bar.close()
    stats = [stats_by_name[j.name] for j in jobs]
    failures = extra_failures + [f for st in stats for f in st["failures"]]
    hist = [0] * len(listing.class_names)
    for st in stats:
        for k, v in st["class_counts"].items():
            hist[int(k)] += v
    index = {
        "format": FORMAT, "count": sum(st["count"] for st in stats), "labeled": labeled,
        "num_classes": len(listing.class_names) or None, "class_names": listing.class_names,
        "class_histogram": hist,
        "shards": [{"name": st["name"], "count": st["count"], "bytes": st["bytes"]} for st in stats],
        "bytes": sum(st["bytes"] for st in stats),
        "failures": failures, "num_failures": len(failures),
        "failure_reasons": _reason_counts(failures),
        "source": io.redact(source), "seed": opts.seed, "max_count": opts.max_count, **(extra_index or {}),
    }
    if failures:
        _write_if_changed(io.join(set_url, "failures.jsonl"),
                          "".join(json.dumps(f, sort_keys=True) + "\n" for f in failures).encode())
    _write_if_changed(io.join(set_url, INDEX_NAME), json.dumps(index, indent=1).encode())
    return index


def _reason_counts(failures: list[dict]) -> dict[str, int]:
    out: dict[str, int] = {}
    for f in failures:
        kind = f["reason"].split(":", 1)[0]
        out[kind] = out.get(kind, 0) + 1
    return dict(sorted(out.items()))


def _write_if_changed(url: str, body: bytes) -> None:
    """A rerun of a finished build leaves every object untouched."""
    try:
        if io.read_bytes(url) == body:
            return
    except FileNotFoundError:
        pass
    io.write_bytes(url, body)


SPLIT_NAMES = {"train", "training", "val", "valid", "validation", "eval", "evaluation", "test", "testing", "dev"}


def warn_split_folders(src: str, class_names: list[str]) -> list[str]:
    """Class folders named like splits (train/, eval/) mean SRC is one level too high: say so."""
    splits = [n for n in class_names if n.lower() in SPLIT_NAMES]
    if len(splits) >= 2:
        where = io.redact(src).rstrip("/")
        log.warning("%s: the class folders %s look like split folders, not classes; if they are splits, build "
                    "each on its own (e.g. %s/%s)", where, ", ".join(splits), where, splits[0])
    return splits


def make_shards(src: str, dst: str, opts: Optional[BuildOptions] = None, **kw) -> dict[str, dict]:
    """Build DST, or DST/{labeled,unlabeled[,eval]} with a label split. Returns the indexes by set."""
    opts = opts or BuildOptions(**kw)
    opts.check()
    listing = list_inputs(src, opts.unlabeled)
    if len(listing) == 0:
        raise ValueError(f"{io.redact(src)}: no images found")
    warn_split_folders(src, listing.class_names)
    idx = np.arange(len(listing), dtype=np.int64)
    sets: dict[str, tuple[np.ndarray, bool, list]] = {}
    if opts.eval_fraction:
        ev, idx = split_eval(listing, idx, opts.eval_fraction, opts.seed)
        sets["eval"] = (ev, True, [])
    runner = _Runner(opts.workers)
    try:
        if opts.labels_per_class or opts.label_fraction:
            want = (lambda n: opts.labels_per_class) if opts.labels_per_class else \
                (lambda n: max(1, int(round(opts.label_fraction * n))))
            verify = lambda ids: runner.map(_verify_one, [listing.url(i) for i in ids])  # noqa: E731
            lab, rest, bad = split_labeled(listing, idx, want, opts.seed, verify)
            if opts.labeled_in_unlabeled:
                rest = np.union1d(rest, lab)
            sets["labeled"] = (lab, True, [])
            sets["unlabeled"] = (rest, False, bad)  # failures are listed with the set they would have fed
        elif sets:
            sets["train"] = (idx, not opts.unlabeled, [])
        else:
            sets[""] = (idx, not opts.unlabeled, [])
        if opts.dry_run:
            return {name: _plan_summary(listing, members, opts) for name, (members, _, _) in sets.items()}
        out = {}
        for name, (members, labeled, bad) in sets.items():
            url = io.join(dst, name) if name else dst
            extra = {"includes_labeled": opts.labeled_in_unlabeled} if name == "unlabeled" else None
            out[name] = write_set(url, listing, members, labeled=labeled, opts=opts, extra_failures=bad,
                                  runner=runner, source=src, extra_index=extra)
        return out
    finally:
        runner.close()


def _plan_summary(listing: Listing, members: np.ndarray, opts: BuildOptions) -> dict:
    shards = plan_shards(listing, members, opts.seed, opts.max_count, opts.max_shard_bytes)
    return {"count": int(len(members)), "shards": [{"count": int(len(s))} for s in shards],
            "listed_bytes": int(listing.sizes[members].sum()), "num_failures": 0, "dry_run": True}


def is_complete(dst: str) -> bool:
    return io.exists(io.join(dst, INDEX_NAME))
