"""What is in a raw bucket: class-per-folder, a flat folder, a CSV/JSONL/Parquet manifest, or a Parquet
table with the images embedded (read a row group at a time: only its path and label columns here).

The listing is kept compact (a list of relative keys plus numpy arrays of labels and sizes), so
1.28M keys cost about 150 MB rather than a dict of info records per key; it is read directory by
directory with ``fs.walk`` rather than in one recursive call.
"""
from __future__ import annotations

import csv
import io as _io
import json
import os
from dataclasses import dataclass, field

import numpy as np

from distssl.data import store
from distssl.data.index import IMAGE_EXTS

MANIFEST_EXTS = (".csv", ".jsonl", ".ndjson", ".parquet")


@dataclass
class Listing:
    base: str  # URL prefix that rels are relative to ("" for absolute manifest entries)
    rels: list[str]
    labels: np.ndarray  # int64, -1 = unknown
    sizes: np.ndarray  # int64 bytes as listed, 0 = unknown
    class_names: list[str] = field(default_factory=list)

    def url(self, i: int) -> str:
        rel = self.rels[i]
        return rel if not self.base or "://" in rel or rel.startswith("/") else store.join(self.base, rel)

    def __len__(self) -> int:
        return len(self.rels)


def _protocol_prefix(src: str) -> str:
    return src.split("://", 1)[0] + "://" if "://" in src and not src.startswith("file://") else ""


def list_folder(src: str, unlabeled: bool) -> Listing:
    fs, root = store.filesystem(src)
    if not fs.isdir(root):
        raise FileNotFoundError(f"{store.redact(src)}: no such folder of images (or the bucket/prefix is empty)")
    root = root.rstrip("/")
    rels, sizes = [], []
    for dirpath, _dirs, files in fs.walk(root, detail=True):
        for name, info in files.items():
            if os.path.splitext(name)[1].lower() not in IMAGE_EXTS:
                continue
            full = info.get("name") or f"{dirpath}/{name}"
            rels.append(full[len(root) + 1:] if full.startswith(root + "/") else full)
            sizes.append(int(info.get("size") or 0))
    order = sorted(range(len(rels)), key=rels.__getitem__)
    rels = [rels[i] for i in order]
    sizes_arr = np.asarray(sizes, dtype=np.int64)[order] if rels else np.zeros(0, dtype=np.int64)
    base = _protocol_prefix(src) + root
    if unlabeled:
        return Listing(base, rels, np.full(len(rels), -1, dtype=np.int64), sizes_arr)
    keep = [i for i, r in enumerate(rels) if "/" in r]
    if not keep:
        raise ValueError(f"{store.redact(src)}: no class subfolders (SRC/<class>/*.jpg); pass --unlabeled for a "
                         f"flat folder of images, or give a CSV/JSONL manifest")
    rels = [rels[i] for i in keep]
    classes = sorted({r.split("/", 1)[0] for r in rels})
    ids = {c: k for k, c in enumerate(classes)}
    labels = np.asarray([ids[r.split("/", 1)[0]] for r in rels], dtype=np.int64)
    return Listing(base, rels, labels, sizes_arr[keep], classes)


def list_manifest(src: str) -> Listing:
    """CSV (header with ``path`` or ``url``, optional ``label``), JSONL or Parquet with the same keys, or a
    Parquet table whose image column holds the images themselves (``datasets``' ``{bytes, path}``
    struct, or raw bytes): then each row is an input ``TABLE.parquet#row=N``. Relative paths are taken
    relative to the manifest's folder; labels may be names or ids."""
    base = src.rsplit("/", 1)[0] if "/" in src else "."
    if src.lower().endswith(".parquet"):
        rels, raw_labels = _parquet_rows(src)
    else:
        text = store.read_bytes(src).decode("utf-8")
        if src.lower().endswith(".csv"):
            rows = list(csv.DictReader(_io.StringIO(text)))
        else:
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        if not rows:
            raise ValueError(f"{store.redact(src)}: the manifest has no rows")
        key = "path" if "path" in rows[0] else "url" if "url" in rows[0] else None
        if key is None:
            raise ValueError(f"{store.redact(src)}: manifest rows need a 'path' or 'url' column "
                             f"(found {list(rows[0])})")
        rels = [str(r[key]) for r in rows]
        raw_labels = [r.get("label") for r in rows]
    if all(lb is None or lb == "" for lb in raw_labels):
        return Listing(base, rels, np.full(len(rels), -1, dtype=np.int64), np.zeros(len(rels), dtype=np.int64))
    names = sorted({str(lb) for lb in raw_labels if lb not in (None, "")},
                   key=lambda s: (0, int(s)) if s.lstrip("-").isdigit() else (1, s))
    ids = {n: i for i, n in enumerate(names)}
    labels = np.asarray([ids[str(lb)] if lb not in (None, "") else -1 for lb in raw_labels], dtype=np.int64)
    return Listing(base, rels, labels, np.zeros(len(rels), dtype=np.int64), names)


def _parquet_rows(src: str) -> tuple[list[str], list]:
    """(inputs, raw labels) of a Parquet manifest or image table, read a row group at a time and only
    the columns needed: a table of embedded images is listed without reading one image."""
    import pyarrow.parquet as pq

    from distssl.shards.inputs import embedded_ref, image_column

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
        rels, labels = [], []
        for g in range(table.metadata.num_row_groups):
            cols = [c for c in (key, label) if c]
            part = table.read_row_group(g, columns=cols) if cols else None
            n = table.metadata.row_group(g).num_rows
            if key is not None:
                rels += [str(v) for v in part.column(key).to_pylist()]
            else:  # each row is an input of its own, named by its row in the table
                rels += [embedded_ref(os.path.basename(path), len(rels) + i) for i in range(n)]
            labels += part.column(label).to_pylist() if label else [None] * n
    if not rels:
        raise ValueError(f"{store.redact(src)}: the manifest has no rows")
    return rels, labels


def list_inputs(src: str, unlabeled: bool = False) -> Listing:
    if src.lower().endswith(MANIFEST_EXTS):
        listing = list_manifest(src)
        if unlabeled:
            listing.labels[:] = -1
            listing.class_names = []
        return listing
    return list_folder(src, unlabeled)
