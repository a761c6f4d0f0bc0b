"""The shard-set index: ``index.json`` beside the shards (counts, class histogram, failures).

A data spec is either a shard-set folder/URL holding ``index.json`` or a WebDataset brace
pattern (``shards/train-{000000..000009}.tar``); with a pattern, per-shard counts are unknown.
Several specs, each with an optional weight, resolve to one :class:`ShardSet` over all their shards
whose epochs draw from each source its share (MosaicML Streaming's ``proportion``): without
weights every shard once per epoch; with weights, source i gives w_i / sum(w) of an epoch's samples,
as whole shards taken in turn from its own endless sequence of seeded permutations, so every shard
of a source is read equally often and an epoch's shard list is a pure function of (seed, epoch).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Optional

import braceexpand
import numpy as np

from distssl.data.spec import data_sources
from distssl.errors import DamagedFile, MissingShardSet
from distssl.storage import store

INDEX_NAME = "index.json"
# what raw image folders hold (the shard builder's inputs): given where shards belong, they are named as such
IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".jfif"}
FORMAT = "distssl.shardset/1"
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")  # the tar members a sample's image is read from, in this order


@dataclass
class ShardSet:
    spec: str
    urls: list[str]
    counts: Optional[list[int]] = None  # per shard, when the index is known
    num_classes: Optional[int] = None
    class_names: list[str] = field(default_factory=list)
    class_histogram: list[int] = field(default_factory=list)
    labeled: Optional[bool] = None
    # several sources: which one each shard comes from, each source's first shard, and its weight
    shard_source: list[int] = field(default_factory=list)
    source_specs: list[str] = field(default_factory=list)
    source_starts: list[int] = field(default_factory=list)
    weights: Optional[list[float]] = None
    sizes: Optional[list[int]] = None  # bytes per shard, when the index is known (the cache checks copies by it)
    cache: Optional[Any] = None  # a data.cache.ShardCache for remote shards (data.cache_dir), else None
    # per shard: whether its samples' ids are their positions (shards indexed in place: foreign keys), not
    # their key numbers (ours); empty = none are
    positional: list[bool] = field(default_factory=list)

    def open(self, shard: int):
        """Shard ``shard`` for sequential reading: through the local cache when there is one and the
        shard is remote, else from its store."""
        url = self.urls[shard]
        if self._cached(url):
            return self.cache.open(url, self.sizes[shard] if self.sizes is not None else None)
        return store.open_stream(url)

    def _cached(self, url: str) -> bool:
        """Whether ``url`` is read through the local cache: there is one and the shard is remote."""
        return self.cache is not None and not store.is_local(store.filesystem(url)[0])

    def drop_copy(self, shard: int) -> bool:
        """A damaged read of shard ``shard``: when it came from the local cache, drop the copy (this process
        then reads the store) and say so; False when the store itself served it."""
        url = self.urls[shard]
        if not self._cached(url) or url in self.cache.bypassed:
            return False
        self.cache.bypass(url)
        return True

    @property
    def total(self) -> Optional[int]:
        return sum(self.counts) if self.counts is not None else None

    def sample_offsets(self) -> list[int]:
        """Per source, where its samples start in one id space (ids = offset + key number)."""
        starts = (self.source_starts or [0]) + [len(self.urls)]
        if self.counts is None:
            return [0] * (len(starts) - 1)
        sizes = [sum(self.counts[starts[i]:starts[i + 1]]) for i in range(len(starts) - 1)]
        return [sum(sizes[:i]) for i in range(len(sizes))]

    def sample_ids(self) -> "SampleIds":
        """How each sample's stable id is made (per-sample algorithm state: FlexMatch, Temporal Ensembling)."""
        offsets = self.sample_offsets()
        bases: list[Optional[int]] = [None] * len(self.urls)
        if any(self.positional) and self.counts is not None:
            starts = (self.source_starts or [0]) + [len(self.urls)]
            for src in range(len(starts) - 1):
                first = offsets[src]
                for shard in range(starts[src], starts[src + 1]):
                    if self.positional[shard]:
                        bases[shard] = first
                    first += self.counts[shard]
        return SampleIds(offsets, bases)

    def source_of(self, shard: int) -> int:
        return self.shard_source[shard] if self.shard_source else 0

    def shards_per_epoch(self) -> list[int]:
        """How many shards each source gives an epoch (weights only): source i's share of the
        samples, w_i / sum(w) of them all, in whole shards of its average size, at least one."""
        starts = self.source_starts + [len(self.urls)]
        n_shards = [starts[i + 1] - starts[i] for i in range(len(self.source_starts))]
        if self.counts is not None:
            n_samples = [sum(self.counts[starts[i]:starts[i + 1]]) for i in range(len(n_shards))]
        else:
            n_samples = n_shards  # unknown counts: shards stand in for samples
        total, wsum = sum(n_samples), sum(self.weights)
        return [max(1, int(round(w / wsum * total * s / max(1, n))))
                for w, s, n in zip(self.weights, n_shards, n_samples)]

    def epoch_shards(self, seed: int, epoch: int) -> np.ndarray:
        """The shards of one epoch, in order: a pure function of (seed, epoch)."""
        order_rng = np.random.default_rng([seed, epoch])
        if not self.weights:
            return order_rng.permutation(len(self.urls))
        starts = self.source_starts + [len(self.urls)]
        chosen = []
        for i, k in enumerate(self.shards_per_epoch()):
            n, cycles = starts[i + 1] - starts[i], {}
            for pos in range(epoch * k, (epoch + 1) * k):  # source i's endless shard sequence
                c = pos // n
                if c not in cycles:
                    cycles[c] = np.random.default_rng([seed, 7919, i, c]).permutation(n)
                chosen.append(starts[i] + int(cycles[c][pos % n]))
        return order_rng.permutation(np.asarray(chosen, dtype=np.int64))


@dataclass(frozen=True)
class SampleIds:
    """A stable id per sample of a shard set, the same on every rank and in every epoch: the builder's key
    number plus its source's offset (our shards number their keys 0..count-1), or, for shards indexed in
    place (whose keys are not dense numbers), the sample's position in its source's shards."""
    offsets: list[int]  # per source: where its ids start
    bases: list[Optional[int]]  # per shard: the id of its first sample when ids are positions, else None

    def of(self, key: str, source: int, shard: int, index: int) -> int:
        import zlib

        base = self.bases[shard] if 0 <= shard < len(self.bases) else None
        if base is not None and index >= 0:
            return base + index
        stem = key.rsplit("/", 1)[-1]
        number = int(stem) if stem.isdigit() else zlib.crc32(key.encode())  # keys that are not numbers hash
        return number + (self.offsets[source] if self.offsets else 0)


def is_pattern(spec: str) -> bool:
    return "{" in spec or spec.endswith(".tar")


def describe_missing(spec: str, key: str = "") -> Optional[str]:
    """None when ``spec`` looks readable, else a sentence saying what is missing and what to do; ``key`` (labeled,
    unlabeled, eval) picks which of a parent folder's sets to suggest."""
    if "://" in spec and not spec.startswith("file://"):
        return None  # remote: checked when opened, with retries
    if is_pattern(spec):
        urls = list(braceexpand.braceexpand(spec))
        missing = [u for u in urls if not store.exists(u)]
        if missing:
            return f"{len(missing)} of {len(urls)} shards do not exist (first: {missing[0]})"
        return None
    if not store.exists(spec):
        return f"{spec} does not exist (build it with distssl-shards SRC {spec})"
    if not store.exists(store.join(spec, INDEX_NAME)):
        return why_not_a_shard_set(spec, key)
    return None


def why_not_a_shard_set(spec: str, key: str = "") -> str:
    """What a folder or prefix without index.json holds instead (shard sets one level down, raw images,
    unfinished shards, nothing of ours) and what to do: one sentence for check_paths and for read_index alike."""
    where = store.redact(spec)
    names = _names(spec)
    sets = [n for n in sorted(names) if "." not in n and store.exists(store.join(spec, n, INDEX_NAME))]
    if sets:  # the parent of a build's labeled/ and unlabeled/
        best = key if key in sets else sets[0]
        others = [s for s in sets if s != best]
        return (f"{where} is not a shard set but holds {len(sets)}: did you mean {store.join(where, best)}?"
                + (f" (also there: {', '.join(others)})" if others else ""))
    images = describe_raw_images(spec, names)
    if images:
        return (f"{where} holds {images}, not shards: build a shard set from it first, e.g. "
                f"`distssl-shards {where} SHARDS` (add --labels-per-class N for a training split: it writes "
                f"SHARDS/labeled and SHARDS/unlabeled), then give the shard set here")
    if not any(name.endswith(".tar") for name in names):
        return (f"{where} has no {INDEX_NAME}: it is not a complete shard set, and holds no .tar shards: give a "
                f"shard-set folder built by distssl-shards (it holds {INDEX_NAME}), or a brace pattern of .tar files")
    return (f"{where} has no {INDEX_NAME}: it is not a complete shard set "
            f"(rerun the same distssl-shards command to finish it, or give a brace pattern of .tar files)")


def _names(folder: str) -> list[str]:
    """The names in a local folder or under a store prefix (one listing call); [] when there is none."""
    try:
        if "://" not in folder or folder.startswith("file://"):
            return os.listdir(folder.removeprefix("file://"))
        fs, path = store.filesystem(folder)
        return [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)]
    except (OSError, ValueError):
        return []


def describe_raw_images(folder: str, top: Optional[list[str]] = None, limit: int = 10_000) -> str:
    """'123 images in 10 class folders (0, 1, ...)' or '12 images' for a folder or store prefix of raw
    images (at its top or one folder down), '' when it holds none. Stops counting at ``limit``: this
    runs on an error path, and a bucket of class folders must not be listed whole to say so. ``top``: the
    folder's names, when the caller has listed them already."""
    def is_image(name: str) -> bool:
        return os.path.splitext(name)[1].lower() in IMAGE_EXTS

    top = _names(folder) if top is None else top
    count = sum(is_image(n) for n in top)
    classes = []
    for name in sorted(top):
        if count >= limit or os.path.splitext(name)[1]:
            continue  # class folders have no extension (and a store lists them without one)
        sub = store.join(folder, name)
        inside = sum(is_image(n) for n in _names(sub))
        if inside:
            classes.append(name)
            count += inside
    if not count:
        return ""
    more = "+" if count >= limit else ""  # counting stopped: not every class folder was looked into
    if classes:
        shown = ", ".join(classes[:5]) + (", ..." if len(classes) > 5 else "")
        return f"{count}{more} images in {len(classes)}{more} class folders ({shown})"
    return f"{count}{more} images"


REBUILD_INDEX = ("rerun the build that made this set (distssl-shards SRC DST with the same arguments rewrites "
                 "the index from the shards' own stats), or copy the set again from where it came from")


def read_index(spec: str) -> dict:
    try:
        index = store.read_json(store.join(spec, INDEX_NAME), REBUILD_INDEX)
    except FileNotFoundError:
        raise MissingShardSet(why_not_a_shard_set(spec)) from None
    if not isinstance(index, dict) or not isinstance(index.get("shards"), list):
        raise DamagedFile(f"{store.redact(store.join(spec, INDEX_NAME))} is not a shard-set index (no 'shards' "
                          f"list): {REBUILD_INDEX}")
    return index


def resolve(spec: Any) -> ShardSet:
    """Turn a data spec (one set, or several with weights: config.DataSpec) into one ShardSet."""
    sources = data_sources(spec)
    if len(sources) == 1 and sources[0][1] is None:
        return resolve_one(sources[0][0])
    parts = [resolve_one(path) for path, _ in sources]
    names = [p.class_names for p in parts]
    same_classes = all(n == names[0] for n in names)
    weights = [w for _, w in sources] if sources[0][1] is not None else None
    out = ShardSet(
        spec=", ".join(path for path, _ in sources),
        urls=[u for p in parts for u in p.urls],
        counts=[c for p in parts for c in p.counts] if all(p.counts is not None for p in parts) else None,
        sizes=[n for p in parts for n in p.sizes] if all(p.sizes is not None for p in parts) else None,
        num_classes=parts[0].num_classes if same_classes else None,
        class_names=names[0] if same_classes else [],
        labeled=parts[0].labeled if all(p.labeled == parts[0].labeled for p in parts) else None,
        shard_source=[i for i, p in enumerate(parts) for _ in p.urls],
        source_specs=[path for path, _ in sources],
        source_starts=list(np.cumsum([0] + [len(p.urls) for p in parts[:-1]]).tolist()),
        weights=weights,
        positional=[f for p in parts for f in (p.positional or [False] * len(p.urls))],
    )
    if same_classes and all(p.class_histogram for p in parts):
        # the classes as an epoch draws them: each source's histogram times its shards read per shard
        repeat = ([k / len(p.urls) for k, p in zip(out.shards_per_epoch(), parts)] if weights
                  else [1.0] * len(parts))
        out.class_histogram = [sum(r * p.class_histogram[c] for r, p in zip(repeat, parts))
                               for c in range(len(parts[0].class_histogram))]
    return out


def resolve_one(spec: str) -> ShardSet:
    """Turn one set's spec into shard URLs plus whatever the index knows."""
    if is_pattern(spec):
        return ShardSet(spec=spec, urls=list(braceexpand.braceexpand(spec)))
    index = read_index(spec)
    shards = index["shards"]
    return ShardSet(
        spec=spec,
        # shards indexed in place keep the URL they were found at: the index may live apart from them
        urls=[s.get("url") or store.join(spec, s["name"]) for s in shards],
        counts=[int(s["count"]) for s in shards],
        sizes=[int(s["bytes"]) for s in shards] if all("bytes" in s for s in shards) else None,
        num_classes=index.get("num_classes"),
        class_names=list(index.get("class_names", [])),
        class_histogram=list(index.get("class_histogram", [])),
        labeled=index.get("labeled"),
        positional=[index.get("sample_ids") == "position"] * len(shards),
    )
