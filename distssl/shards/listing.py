"""What is in a raw bucket: class-per-folder, a flat folder, a CSV/JSONL/Parquet manifest, or a Parquet
table with the images embedded (read a row group at a time: only its path and label columns here).

The listing is kept compact (a list of relative keys plus numpy arrays of labels and sizes), so
1.28M keys cost about 150 MB rather than a dict of info records per key; it is read directory by
directory with ``fs.walk`` rather than in one recursive call.
"""
from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field
from typing import Iterator, Optional

import numpy as np

from distssl.data.index import IMAGE_EXTS
from distssl.shards.inputs import embedded_ref, image_column
from distssl.storage import store

MANIFEST_EXTS = (".csv", ".jsonl", ".ndjson", ".parquet")


@dataclass
class Listing:
    base: str  # URL prefix that rels are relative to ("" for absolute manifest entries)
    rels: list[str]
    labels: np.ndarray  # int64, -1 = unknown
    sizes: np.ndarray  # int64 bytes as listed, 0 = unknown
    class_names: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (key, reason): not listed (Rows.skipped)

    def url(self, i: int) -> str:
        rel = self.rels[i]
        return rel if not self.base or "://" in rel or rel.startswith("/") else store.join(self.base, rel)

    def __len__(self) -> int:
        return len(self.rels)


def _protocol_prefix(src: str) -> str:
    return src.split("://", 1)[0] + "://" if "://" in src and not src.startswith("file://") else ""


@dataclass
class Rows:
    """A source listed one input at a time: (key relative to ``base``, listed size or 0, label text or
    None). ``by_folder``: the labels are class folders, and keys outside one are dropped when labeled.
    What the in-memory listing (``list_inputs``) and the partitioned one (distssl.shards.partitions) both
    consume, so they cannot disagree on what a source holds."""
    base: str
    rows: Iterator[tuple[str, int, Optional[str]]]
    by_folder: bool
    # files the listing passed over, (key, reason): not an image by its extension, a dangling link; filled as
    # ``rows`` is read, so the build counts and names them instead of losing them without a word
    skipped: list[tuple[str, str]] = field(default_factory=list)


def _not_an_image(name: str) -> Optional[str]:
    ext = os.path.splitext(name)[1].lower()
    return None if ext in IMAGE_EXTS else f"not an image ({ext or 'no extension'})"


def folder_rows(src: str) -> Rows:
    """A folder's images, read directory by directory (never one recursive listing). A local folder's links
    to folders and files are followed, each real folder once (no loops: the usual way to make a subset or a
    class split without copying); a link to nothing is skipped and counted, as is every file that is not an
    image."""
    fs, root = store.filesystem(src)
    if not fs.isdir(root):
        raise FileNotFoundError(f"{store.redact(src)}: no such folder of images (or the bucket/prefix is empty)")
    root = root.rstrip("/")
    out = Rows(_protocol_prefix(src) + root, iter(()), True)

    def label_of(rel: str) -> Optional[str]:
        return rel.split("/", 1)[0] if "/" in rel else None

    def local_rows():
        seen = set()
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            real = os.path.realpath(dirpath)
            if real in seen:  # a link back up the tree, or a second link to a folder already read
                dirnames[:] = []
                continue
            seen.add(real)
            dirnames.sort()
            for name in sorted(filenames):
                full = os.path.join(dirpath, name)
                rel = os.path.relpath(full, root).replace(os.sep, "/")
                why = (None if os.path.exists(full) else "a link to nothing") or _not_an_image(name)
                if why:
                    out.skipped.append((rel, why))
                    continue
                yield rel, os.path.getsize(full), label_of(rel)

    def store_rows():
        for dirpath, _dirs, files in fs.walk(root, detail=True):
            for name, info in files.items():
                full = info.get("name") or f"{dirpath}/{name}"
                rel = full[len(root) + 1:] if full.startswith(root + "/") else full
                why = _not_an_image(name)
                if why:
                    out.skipped.append((rel, why))
                    continue
                yield rel, int(info.get("size") or 0), label_of(rel)
    out.rows = local_rows() if store.is_local(fs) else store_rows()
    return out


def manifest_rows(src: str) -> Rows:
    """CSV (header with ``path`` or ``url``, optional ``label``), JSONL or Parquet with the same keys, or a
    Parquet table whose image column holds the images themselves (``datasets``' ``{bytes, path}``
    struct, or raw bytes): then each row is an input ``TABLE.parquet#row=N``. Relative paths are taken
    relative to the manifest's folder; labels may be names or ids. Read as a stream (CSV/JSONL line by
    line, Parquet a row group at a time)."""
    base = src.rsplit("/", 1)[0] if "/" in src else "."
    if src.lower().endswith(".parquet"):
        return Rows(base, ((rel, 0, label) for rel, label in _parquet_rows(src)), False)
    fs, path = store.filesystem(src)

    def rows():
        with store.retry(fs.open, path, "rt", encoding="utf-8", what=src) as f:
            if src.lower().endswith(".csv"):
                records = csv.DictReader(f)
            else:
                records = (json.loads(line) for line in f if line.strip())
            key, n = None, 0
            for r in records:
                if key is None:
                    key = "path" if "path" in r else "url" if "url" in r else None
                    if key is None:
                        raise ValueError(f"{store.redact(src)}: manifest rows need a 'path' or 'url' column "
                                         f"(found {list(r)})")
                label = r.get("label")
                n += 1
                yield str(r[key]), 0, None if label in (None, "") else str(label)
            if n == 0:
                raise ValueError(f"{store.redact(src)}: the manifest has no rows")
    return Rows(base, rows(), False)


def source_rows(src: str) -> Rows:
    return manifest_rows(src) if src.lower().endswith(MANIFEST_EXTS) else folder_rows(src)


def class_order(names) -> list[str]:
    """Class names in id order: folders alphabetically, manifest labels numerically where they are ids."""
    return sorted(names, key=lambda s: (0, int(s)) if s.lstrip("-").isdigit() else (1, s))


def no_class_folders(src: str) -> ValueError:
    return ValueError(f"{store.redact(src)}: no class subfolders (SRC/<class>/*.jpg); pass --unlabeled for a "
                      f"flat folder of images, or give a CSV/JSONL manifest")


def list_inputs(src: str, unlabeled: bool = False) -> Listing:
    """The whole source in one compact listing: a folder's keys sorted, a manifest's in its order."""
    listed = source_rows(src)
    rels, sizes, texts = [], [], []
    for rel, size, label in listed.rows:
        if listed.by_folder and label is None and not unlabeled:
            listed.skipped.append((rel, "outside any class folder"))
            continue
        rels.append(rel)
        sizes.append(size)
        texts.append(None if unlabeled else label)
    if listed.by_folder and not unlabeled and not rels:
        if any(True for _ in source_rows(src).rows):
            raise no_class_folders(src)
    order = sorted(range(len(rels)), key=rels.__getitem__) if listed.by_folder else list(range(len(rels)))
    rels = [rels[i] for i in order]
    sizes_arr = np.asarray(sizes, dtype=np.int64)[order] if rels else np.zeros(0, dtype=np.int64)
    named = {t for t in texts if t is not None}
    names = sorted(named) if listed.by_folder else class_order(named)
    ids = {n: k for k, n in enumerate(names)}
    labels = np.asarray([ids[texts[i]] if texts[i] is not None else -1 for i in order], dtype=np.int64)
    return Listing(listed.base, rels, labels.reshape(-1), sizes_arr, names, listed.skipped)


def _parquet_rows(src: str) -> Iterator[tuple[str, Optional[str]]]:
    """(input, label text or None) of a Parquet manifest or image table, read a row group at a time and
    only the columns needed: a table of embedded images is listed without reading one image."""
    import pyarrow.parquet as pq

    fs, path = store.filesystem(src)
    with store.retry(fs.open, path, "rb", what=src) as f:
        table = pq.ParquetFile(f)
        names = table.schema_arrow.names
        key = "path" if "path" in names else "url" if "url" in names else None
        images = image_column(table.schema_arrow) if key is None else None
        if key is None and images is None:
            raise ValueError(f"{store.redact(src)}: a Parquet input needs a 'path' or 'url' column (a manifest) "
                             f"or an image column (binary, or a struct with binary 'bytes'): found {names}")
        label = "label" if "label" in names else None
        n = 0
        for g in range(table.metadata.num_row_groups):
            cols = [c for c in (key, label) if c]
            part = table.read_row_group(g, columns=cols) if cols else None
            rows = table.metadata.row_group(g).num_rows
            rels = ([str(v) for v in part.column(key).to_pylist()] if key is not None else
                    [embedded_ref(os.path.basename(path), n + i) for i in range(rows)])  # a row, an input
            labels = part.column(label).to_pylist() if label else [None] * rows
            for rel, lb in zip(rels, labels):
                yield rel, None if lb in (None, "") else str(lb)
            n += rows
    if n == 0:
        raise ValueError(f"{store.redact(src)}: the manifest has no rows")
