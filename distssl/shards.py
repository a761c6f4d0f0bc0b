"""Raw images -> WebDataset shard sets with ``index.json``.

Why the shape: images are verified (decoded once) before the label split, so a corrupt file can
never take a labeled slot; the assignment of images to shards is a pure function of the sorted
listing and the seed, so a rerun writes the same shards and can skip the ones already complete;
every shard is written under a temporary name and renamed, and ``index.json`` is written last:
a shard set without it is never complete.
"""
from __future__ import annotations

import io as _io
import json
import os
import re
import tarfile
import time
import warnings
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional

import numpy as np
from PIL import Image

from distssl.data import io
from distssl.data.index import FORMAT, INDEX_NAME, write_index

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm"}
KEEP_FORMATS = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp"}
_OBJECT_REPR = re.compile(r"<[^<>]* at 0x[0-9a-f]+>")  # keeps failure reasons identical across reruns


@dataclass
class Item:
    path: str  # URL of the source image
    rel: str  # path relative to SRC, written into the sample's json
    label: int  # -1 when unknown


@dataclass
class Failure:
    input: str
    reason: str


def list_images(src: str, unlabeled: bool) -> tuple[list[Item], list[str]]:
    """Sorted image listing; class-per-folder unless ``unlabeled``. Returns (items, class_names)."""
    fs, root = io.filesystem(src)
    if not fs.isdir(root):
        raise FileNotFoundError(f"{io.redact(src)}: no such folder of images")
    root = root.rstrip("/")
    paths = sorted(p for p in fs.find(root) if os.path.splitext(p)[1].lower() in IMAGE_EXTS)
    prefix = "" if "://" not in src else src.split("://", 1)[0] + "://"
    items, classes = [], []
    if unlabeled:
        items = [Item(prefix + p, p[len(root) + 1:], -1) for p in paths]
    else:
        rels = [p[len(root) + 1:] for p in paths]
        classes = sorted({r.split("/", 1)[0] for r in rels if "/" in r})
        if not classes:
            raise ValueError(f"{io.redact(src)}: no class subfolders (SRC/<class>/*.png); "
                             f"pass --unlabeled for a flat folder of images")
        ids = {c: i for i, c in enumerate(classes)}
        items = [Item(prefix + p, r, ids[r.split("/", 1)[0]]) for p, r in zip(paths, rels) if "/" in r]
    return items, classes


def verify_image(data: bytes) -> tuple[Optional[str], Optional[str]]:
    """(extension to store under, None) for a good image, (None, reason) for a bad one."""
    if not data:
        return None, "empty file"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(_io.BytesIO(data)) as img:
                fmt = img.format
                img.load()
                if img.width < 1 or img.height < 1:
                    return None, "zero-size image"
    except Image.DecompressionBombError as e:
        return None, f"decompression bomb: {e}"
    except Image.DecompressionBombWarning as e:
        return None, f"decompression bomb: {e}"
    except Exception as e:  # PIL raises many types for truncated / non-image data
        return None, f"undecodable: {type(e).__name__}: {_OBJECT_REPR.sub('data', str(e))}"
    return KEEP_FORMATS.get(fmt, "png"), None


def reencode_png(data: bytes) -> bytes:
    with Image.open(_io.BytesIO(data)) as img:
        out = _io.BytesIO()
        img.save(out, format="PNG")
        return out.getvalue()


def _tar_add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(payload), 0, 0o644
    tar.addfile(info, _io.BytesIO(payload))


def write_shard(url: str, samples: Iterable[tuple[str, str, bytes, int, dict]], labeled: bool) -> tuple[int, int]:
    """Write one tar shard atomically. Each sample: (key, ext, image bytes, label, meta)."""
    count = 0
    buf = _io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, ext, data, label, meta in samples:
            _tar_add(tar, f"{key}.{ext}", data)
            if labeled:
                _tar_add(tar, f"{key}.cls", str(label).encode())
            _tar_add(tar, f"{key}.json", json.dumps(meta, sort_keys=True).encode())
            count += 1
    payload = buf.getvalue()
    io.write_bytes(url, payload)
    return count, len(payload)


def stratified_split(items: list[Item], per_class: int, seed: int) -> tuple[list[Item], list[Item]]:
    """Pick ``per_class`` items of every class (seeded); the rest are unlabeled."""
    rng = np.random.default_rng(seed)
    by_class: dict[int, list[int]] = {}
    for i, it in enumerate(items):
        by_class.setdefault(it.label, []).append(i)
    chosen: set[int] = set()
    for label in sorted(by_class):
        idx = by_class[label]
        if len(idx) < per_class:
            raise ValueError(f"--labels-per-class {per_class}: class {label} has only {len(idx)} good images")
        chosen.update(rng.choice(idx, size=per_class, replace=False).tolist())
    labeled = [it for i, it in enumerate(items) if i in chosen]
    unlabeled = [it for i, it in enumerate(items) if i not in chosen]
    return labeled, unlabeled


def plan_shards(items: list[Item], max_count: int, seed: int) -> list[list[Item]]:
    """Seeded shuffle (so shards mix classes) then fixed-size chunks."""
    order = np.random.default_rng(seed).permutation(len(items))
    shuffled = [items[i] for i in order]
    return [shuffled[i:i + max_count] for i in range(0, len(shuffled), max_count)]


def _iter_samples(chunk: list[Item], start: int, ext_of: dict[str, str]) -> Iterator[tuple]:
    for j, it in enumerate(chunk):
        data = io.read_bytes(it.path)
        ext = ext_of[it.path]
        if ext == "png" and not it.path.lower().endswith(".png"):
            data = reencode_png(data)
        meta = {"path": it.rel}
        if it.label >= 0:
            meta["label"] = it.label
        yield f"{start + j:09d}", ext, data, it.label, meta


def build_set(dst: str, items: list[Item], *, labeled: bool, class_names: list[str], ext_of: dict[str, str],
              failures: list[Failure], max_count: int, seed: int, source: str, progress: bool = True) -> dict:
    """Write one shard set (shards, then failures.jsonl, then index.json last)."""
    from tqdm import tqdm

    chunks = plan_shards(items, max_count, seed)
    fs, root = io.filesystem(dst)
    fs.makedirs(root, exist_ok=True)
    shards, start = [], 0
    bar = tqdm(total=len(items), desc=f"write {os.path.basename(dst.rstrip('/'))}", unit="img",
               disable=not progress, dynamic_ncols=True)
    for n, chunk in enumerate(chunks):
        name = f"shard-{n:06d}.tar"
        url = io.join(dst, name)
        if fs.exists(io.join(root, name)):  # complete: written under a tmp name and renamed
            size = fs.info(io.join(root, name))["size"]
            shards.append({"name": name, "count": len(chunk), "bytes": size})
        else:
            count, size = write_shard(url, _iter_samples(chunk, start, ext_of), labeled)
            shards.append({"name": name, "count": count, "bytes": size})
        start += len(chunk)
        bar.update(len(chunk))
    bar.close()
    num_classes = len(class_names) if class_names else None
    hist = [0] * (num_classes or 0)
    for it in items:
        if 0 <= it.label < len(hist):
            hist[it.label] += 1
    if failures:
        io.write_bytes(io.join(dst, "failures.jsonl"),
                       "".join(json.dumps(f.__dict__) + "\n" for f in failures).encode())
    index = {
        "format": FORMAT,
        "count": len(items),
        "labeled": labeled,
        "num_classes": num_classes,
        "class_names": class_names,
        "class_histogram": hist,
        "shards": shards,
        "failures": [f.__dict__ for f in failures],
        "num_failures": len(failures),
        "source": io.redact(source),
        "seed": seed,
        "max_count": max_count,
    }
    write_index(dst, index)
    return index


def verify_all(items: list[Item], progress: bool = True) -> tuple[list[Item], list[Failure], dict[str, str]]:
    from tqdm import tqdm

    good, failures, ext_of = [], [], {}
    t0 = time.time()
    bar = tqdm(items, desc="verify", unit="img", disable=not progress, dynamic_ncols=True)
    for it in bar:
        try:
            data = io.read_bytes(it.path)
        except Exception as e:
            failures.append(Failure(it.rel, f"unreadable: {type(e).__name__}: {e}"))
            continue
        ext, reason = verify_image(data)
        if reason:
            failures.append(Failure(it.rel, reason))
        else:
            good.append(it)
            ext_of[it.path] = ext
        if len(good) % 500 == 0:
            bar.set_postfix(failed=len(failures), img_s=f"{(len(good) + len(failures)) / (time.time() - t0 + 1e-9):.0f}")
    return good, failures, ext_of


def make_shards(src: str, dst: str, *, labels_per_class: Optional[int] = None, unlabeled: bool = False,
                seed: int = 0, max_count: int = 1000, progress: bool = True) -> dict[str, dict]:
    """Build DST (or DST/labeled + DST/unlabeled with ``labels_per_class``). Returns the indexes."""
    if max_count < 1:
        raise ValueError("--max-count must be >= 1")
    if labels_per_class is not None and unlabeled:
        raise ValueError("--labels-per-class needs class subfolders; it cannot be combined with --unlabeled")
    if labels_per_class is not None and labels_per_class < 1:
        raise ValueError("--labels-per-class must be >= 1")
    items, classes = list_images(src, unlabeled)
    if not items:
        raise ValueError(f"{io.redact(src)}: no images found ({', '.join(sorted(IMAGE_EXTS))})")
    good, failures, ext_of = verify_all(items, progress)
    kw = dict(class_names=classes, ext_of=ext_of, max_count=max_count, seed=seed, source=src, progress=progress)
    if labels_per_class is None:
        return {"": build_set(dst, good, labeled=not unlabeled, failures=failures, **kw)}
    lab, unl = stratified_split(good, labels_per_class, seed)
    return {
        "labeled": build_set(io.join(dst, "labeled"), lab, labeled=True, failures=[], **kw),
        # failures are listed once, with the set the images would have fed
        "unlabeled": build_set(io.join(dst, "unlabeled"), unl, labeled=False, failures=failures, **kw),
    }


def is_complete(dst: str) -> bool:
    return io.exists(io.join(dst, INDEX_NAME))
