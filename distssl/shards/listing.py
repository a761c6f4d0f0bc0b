"""What is in a raw bucket: class-per-folder, a flat folder, or a CSV/JSONL manifest.

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

MANIFEST_EXTS = (".csv", ".jsonl", ".ndjson")


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
    """CSV (header with ``path`` or ``url``, optional ``label``) or JSONL with the same keys.
    Relative paths are taken relative to the manifest's folder; labels may be names or ids."""
    text = store.read_bytes(src).decode("utf-8")
    if src.lower().endswith(".csv"):
        rows = list(csv.DictReader(_io.StringIO(text)))
    else:
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    if not rows:
        raise ValueError(f"{store.redact(src)}: the manifest has no rows")
    key = "path" if "path" in rows[0] else "url" if "url" in rows[0] else None
    if key is None:
        raise ValueError(f"{store.redact(src)}: manifest rows need a 'path' or 'url' column (found {list(rows[0])})")
    base = src.rsplit("/", 1)[0] if "/" in src else "."
    rels = [str(r[key]) for r in rows]
    raw_labels = [r.get("label") for r in rows]
    if all(l is None or l == "" for l in raw_labels):
        return Listing(base, rels, np.full(len(rels), -1, dtype=np.int64), np.zeros(len(rels), dtype=np.int64))
    names = sorted({str(l) for l in raw_labels if l not in (None, "")},
                   key=lambda s: (0, int(s)) if s.lstrip("-").isdigit() else (1, s))
    ids = {n: i for i, n in enumerate(names)}
    labels = np.asarray([ids[str(l)] if l not in (None, "") else -1 for l in raw_labels], dtype=np.int64)
    return Listing(base, rels, labels, np.zeros(len(rels), dtype=np.int64), names)


def list_inputs(src: str, unlabeled: bool = False) -> Listing:
    if src.lower().endswith(MANIFEST_EXTS):
        listing = list_manifest(src)
        if unlabeled:
            listing.labels[:] = -1
            listing.class_names = []
        return listing
    return list_folder(src, unlabeled)
