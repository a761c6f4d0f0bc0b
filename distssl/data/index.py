"""The shard-set index: ``index.json`` beside the shards (counts, class histogram, failures).

A data spec is either a shard-set folder/URL holding ``index.json`` or a WebDataset brace
pattern (``shards/train-{000000..000009}.tar``); with a pattern, per-shard counts are unknown.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Optional

import braceexpand

from distssl.data import io

INDEX_NAME = "index.json"
FORMAT = "distssl.shardset/1"


@dataclass
class ShardSet:
    spec: str
    urls: list[str]
    counts: Optional[list[int]] = None  # per shard, when the index is known
    num_classes: Optional[int] = None
    class_names: list[str] = field(default_factory=list)
    class_histogram: list[int] = field(default_factory=list)
    labeled: Optional[bool] = None

    @property
    def total(self) -> Optional[int]:
        return sum(self.counts) if self.counts is not None else None


def is_pattern(spec: str) -> bool:
    return "{" in spec or spec.endswith(".tar")


def describe_missing(spec: str) -> Optional[str]:
    """None when ``spec`` looks readable, else a sentence saying what is missing and what to do."""
    if "://" in spec and not spec.startswith("file://"):
        return None  # remote: checked when opened, with retries
    if is_pattern(spec):
        urls = list(braceexpand.braceexpand(spec))
        missing = [u for u in urls if not io.exists(u)]
        if missing:
            return f"{len(missing)} of {len(urls)} shards do not exist (first: {missing[0]})"
        return None
    if not io.exists(spec):
        return f"{spec} does not exist (build it with tools/make_shards.py SRC {spec})"
    if not io.exists(io.join(spec, INDEX_NAME)):
        return (f"{spec} has no {INDEX_NAME}: it is not a complete shard set "
                f"(rerun tools/make_shards.py to finish it, or give a brace pattern of .tar files)")
    return None


def read_index(spec: str) -> dict:
    try:
        return json.loads(io.read_bytes(io.join(spec, INDEX_NAME)))
    except FileNotFoundError:
        raise FileNotFoundError(f"{io.redact(spec)}: no {INDEX_NAME} (not a complete shard set)") from None


def resolve(spec: str) -> ShardSet:
    """Turn a data spec into shard URLs plus whatever the index knows."""
    if is_pattern(spec):
        return ShardSet(spec=spec, urls=list(braceexpand.braceexpand(spec)))
    index = read_index(spec)
    shards = index["shards"]
    return ShardSet(
        spec=spec,
        urls=[io.join(spec, s["name"]) for s in shards],
        counts=[int(s["count"]) for s in shards],
        num_classes=index.get("num_classes"),
        class_names=list(index.get("class_names", [])),
        class_histogram=list(index.get("class_histogram", [])),
        labeled=index.get("labeled"),
    )
