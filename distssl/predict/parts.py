"""What a prediction reads, cut into parts: one part per shard of a shard set (anything ``data.*`` takes:
a set's folder, weighted lists, brace patterns, a set indexed in place), or runs of ``part_size``
inputs of a raw folder, bucket prefix or manifest, read directly (no shards built). Parts are numbered
in a fixed order, so every rank of any launch agrees on them, and each is predicted and written whole.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Iterator, Optional

from distssl.data.index import IMAGE_KEYS, INDEX_NAME, is_pattern, resolve
from distssl.data.spec import data_sources
from distssl.data.streams import resilient_samples
from distssl.shards.inputs import read_many
from distssl.shards.listing import list_inputs
from distssl.storage import store


@dataclass
class Part:
    number: int
    shard: Optional[str] = None  # a shard's URL, or None for raw inputs
    class_names: list[str] = field(default_factory=list)  # the shard set's, to map its cls to the model's
    inputs: list[tuple[str, str, int]] = field(default_factory=list)  # raw: (url, path as given, label or -1)

    @property
    def name(self) -> str:
        return f"part-{self.number:06d}"


@dataclass
class Sample:
    key: str
    source: str  # the shard URL, or the input's path relative to the raw root
    data: Optional[bytes]  # image bytes (None: the sample holds no image; counted, not predicted)
    true_label: int  # in the set's own class order, -1 unknown
    sha256: Optional[str]


def _is_shard_spec(spec) -> bool:
    sources = data_sources(spec)
    return all(is_pattern(p) or store.exists(store.join(p, INDEX_NAME)) for p, _ in sources)


def make_parts(spec, part_size: int = 1000) -> list[Part]:
    if _is_shard_spec(spec):
        shards = resolve(spec)
        return [Part(i, shard=url, class_names=shards.class_names) for i, url in enumerate(shards.urls)]

    path = str(spec)
    try:
        listing = list_inputs(path)
    except ValueError as e:  # a flat folder: no class folders, no labels
        if "no class subfolders" not in str(e):
            raise
        listing = list_inputs(path, unlabeled=True)
    if len(listing) == 0:
        raise FileNotFoundError(f"{store.redact(path)}: no images found")
    rows = [(listing.url(i), listing.rels[i], int(listing.labels[i])) for i in range(len(listing))]
    return [Part(n, class_names=listing.class_names, inputs=rows[s: s + part_size])
            for n, s in enumerate(range(0, len(rows), part_size))]


def _shard_label(fields: dict) -> int:
    if "cls" in fields:
        try:
            return int(fields["cls"].decode().strip())
        except ValueError:
            return -1
    try:  # an unlabeled set built here keeps the true label in the json, when it was known
        return int(json.loads(fields["json"]).get("label", -1)) if "json" in fields else -1
    except (ValueError, AttributeError):
        return -1


def part_samples(part: Part) -> Iterator[Sample]:
    if part.shard is not None:

        for raw in resilient_samples(part.shard):
            data = next((raw.fields[k] for k in IMAGE_KEYS if k in raw.fields), None)
            sha = None
            if "json" in raw.fields:
                try:
                    sha = json.loads(raw.fields["json"]).get("sha256")
                except (ValueError, AttributeError):
                    sha = None
            if sha is None and data is not None:
                sha = hashlib.sha256(data).hexdigest()
            yield Sample(raw.key, store.redact(part.shard), data, _shard_label(raw.fields), sha)
        return

    for (url, rel, label), data in zip(part.inputs, read_many([u for u, _, _ in part.inputs])):
        if isinstance(data, (FileNotFoundError, PermissionError, IsADirectoryError)):
            data = None  # gone since it was listed: counted as unreadable
        elif isinstance(data, Exception):
            raise OSError(f"{store.redact(url)}: unreadable after retries ({data}); rerun the same command: "
                          f"finished parts are kept") from data
        yield Sample(rel, rel, data, label, hashlib.sha256(data).hexdigest() if data is not None else None)
