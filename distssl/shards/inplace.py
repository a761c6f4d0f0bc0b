"""Index shards another tool wrote, in place: ``distssl-shards index SPEC --out DIR``.

img2dataset's shards (``jpg`` + ``json`` + ``txt`` per key), ImageNet's (``jpeg`` + ``cls``) or a lab's
own are plain tars; what they lack is our ``index.json`` (counts and bytes per shard, the class
histogram), without which a run cannot resume exactly or elastically, weigh sources or check a cached
copy by size. This writes one for them without rewriting a byte: each shard is read for its tar headers
only (the members' data is seeked over where the store can seek; only the small ``cls`` members are
read), in parallel over local processes or Ray tasks (the builder's runners). The index keeps the shard
URLs as found, so it may live apart from read-only shards, and says that sample ids are positions
(``"sample_ids": "position"``): foreign keys are neither numbers nor dense, and per-sample state
(FlexMatch, Temporal Ensembling) needs ids in [0, count).

A sample is what the training stream reads as one: consecutive members sharing a key (the member's
path up to the first dot of its base name, folders kept), so the counts here are the stream's. A
shard that cannot be read (damaged, cut short, unreachable) is left out of the index and listed in
its ``failures``, with the reason.
"""
from __future__ import annotations

import json
import os
import tarfile
from collections import Counter
from typing import Optional

import braceexpand

from distssl.data.index import FORMAT, IMAGE_KEYS, INDEX_NAME
from distssl.data.tar import tar_members
from distssl.shards.runners import make_runner
from distssl.storage import store
from distssl.tracking.progress import bar as progress_bar

LIST_EXTS = (".txt", ".list", ".lst")


def shard_urls(spec: str) -> list[str]:
    """The shards a SPEC names: brace patterns (several joined by ``::``), a list file (one URL or path per
    line; relative ones against the file's folder), or a folder or prefix holding ``.tar`` files (searched
    recursively, in name order)."""
    if spec.lower().endswith(LIST_EXTS):
        base = spec.rsplit("/", 1)[0] if "/" in spec else "."
        lines = [ln.strip() for ln in store.read_bytes(spec).decode("utf-8").splitlines()]
        urls = [ln if "://" in ln or ln.startswith("/") else store.join(base, ln)
                for ln in lines if ln and not ln.startswith("#")]
    elif "{" in spec or spec.endswith(".tar"):
        urls = [u for part in spec.split("::") for u in braceexpand.braceexpand(part)]
        missing = [u for u in urls if not store.exists(u)]
        if missing:
            raise FileNotFoundError(f"{len(missing)} of {len(urls)} shards of {store.redact(spec)} do not exist "
                                    f"(first: {store.redact(missing[0])}): check the pattern's range")
    else:
        fs, root = store.filesystem(spec)
        if not fs.isdir(root):
            raise FileNotFoundError(f"{store.redact(spec)}: no such folder or prefix of .tar shards")
        prefix = spec.split("://", 1)[0] + "://" if "://" in spec and not spec.startswith("file://") else ""
        urls = sorted(prefix + p for p in fs.find(root) if p.endswith(".tar"))
    # local paths absolute: the index keeps them, and a run may start from another folder
    urls = [u if "://" in u else os.path.abspath(u) for u in urls]
    if not urls:
        raise ValueError(f"{store.redact(spec)} names no .tar shards: give a brace pattern "
                         f"(shards/{{00000..00099}}.tar), a folder or prefix holding .tar files, or a list file")
    return urls


def _sample_key(name: str) -> Optional[tuple[str, str]]:
    """(key, extension) of a member as the training stream groups it (distssl.data.streams.tar_samples)."""
    base = name.rsplit("/", 1)[-1]
    if "." not in base:
        return None
    stem, ext = base.split(".", 1)
    return name[: len(name) - len(base)] + stem, ext.lower()


def scan_shard(url: str) -> dict:
    """One shard's counts from its headers: samples, samples with an image, member extensions, the ``cls``
    labels and the file's bytes; ``{"url", "error"}`` when it cannot be read."""
    fs, path = store.filesystem(url)
    try:
        size = int(store.retry(fs.size, path, what=url))
        with store.retry(fs.open, path, "rb", what=url) as f:
            count, images, exts, labels, unlabeled_images = 0, 0, Counter(), Counter(), 0
            key, has_image, label = None, False, None

            def close_sample():
                nonlocal images, unlabeled_images
                if key is None:
                    return
                images += has_image
                if label is not None:
                    labels[label] += 1
                elif has_image:
                    unlabeled_images += 1

            for name, data in tar_members(f, keep=lambda n: n.lower().endswith(".cls")):
                parsed = _sample_key(name)
                if parsed is None:
                    continue
                k, ext = parsed
                if k != key:
                    close_sample()
                    key, has_image, label, count = k, False, None, count + 1
                exts[ext] += 1
                has_image |= ext in IMAGE_KEYS
                if ext == "cls" and data is not None:
                    try:
                        label = int(data.decode().strip())
                    except ValueError:
                        label = None
            close_sample()
            if f.tell() > size:  # a member seeked over ran past the end: the shard was cut short
                raise tarfile.ReadError("unexpected end of data (truncated tar member)")
    except (OSError, tarfile.TarError, EOFError) as e:
        return {"url": url, "error": f"{type(e).__name__}: {e}"}
    return {"url": url, "bytes": size, "count": count, "images": images, "exts": dict(exts),
            "labels": {str(c): n for c, n in labels.items()}, "without_cls": unlabeled_images}


def read_class_names(path: str) -> list[str]:
    """Class names from a text file (one per line, in class-id order) or JSON (a list, or {id: name})."""
    text = store.read_bytes(path).decode("utf-8")
    if path.lower().endswith(".json"):
        names = json.loads(text)
        if isinstance(names, dict):
            ids = sorted(int(k) for k in names)
            if ids != list(range(len(ids))):
                raise ValueError(f"{path}: class ids must be 0..N-1 (found {ids[:5]}...)")
            return [str(names[str(i)] if str(i) in names else names[i]) for i in ids]
        if not isinstance(names, list):
            raise ValueError(f"{path}: a JSON class-name file holds a list of names or an {{id: name}} object")
        return [str(n) for n in names]
    return [ln.strip() for ln in text.splitlines() if ln.strip()]


def index_shards(spec: str, out: str, class_names: Optional[list[str]] = None, workers: int = 1,
                 ray_address: Optional[str] = None, progress: bool = True) -> dict:
    """Write OUT/index.json for the shards SPEC names (their bytes untouched); returns the index."""
    urls = shard_urls(spec)
    runner = make_runner(workers, ray_address, out)
    scanned: dict[str, dict] = {}
    try:
        bar = progress_bar(total=len(urls), desc="index", unit="shard", disable=not progress)
        for st in runner.unordered(scan_shard, urls):
            scanned[st["url"]] = st
            bar.update(1)
            bar.set_postfix(samples=sum(s.get("count", 0) for s in scanned.values()))
        bar.close()
    finally:
        runner.close()
    ordered = [scanned[u] for u in urls]
    good = [s for s in ordered if "error" not in s and s["count"] > 0]
    failures = [{"shard": store.redact(s["url"]), "reason": s["error"]} for s in ordered if "error" in s]
    failures += [{"shard": store.redact(s["url"]), "reason": "empty: no samples"}
                 for s in ordered if "error" not in s and s["count"] == 0]
    labels = Counter()
    for s in good:
        labels.update({int(c): n for c, n in s["labels"].items()})
    labeled = bool(labels) and all(s["without_cls"] == 0 for s in good)
    num_classes = len(class_names) if class_names else (max(labels) + 1 if labels else None)
    if class_names and labels and max(labels) >= len(class_names):
        raise ValueError(f"the shards hold cls {max(labels)} but --class-names lists {len(class_names)} names")
    names = class_names or ([str(i) for i in range(num_classes)] if num_classes else [])
    exts = Counter()
    for s in good:
        exts.update(s["exts"])
    index = {
        "format": FORMAT, "count": sum(s["count"] for s in good), "labeled": labeled,
        "num_classes": num_classes, "class_names": names,
        "class_histogram": [labels.get(c, 0) for c in range(num_classes)] if num_classes and labels else [],
        "shards": [{"name": _display_name(s["url"], out), "url": s["url"], "count": s["count"], "bytes": s["bytes"]}
                   for s in good],
        "bytes": sum(s["bytes"] for s in good), "images": sum(s["images"] for s in good),
        "members": dict(sorted(exts.items())),
        "failures": failures, "num_failures": len(failures),
        "failure_reasons": dict(Counter(f["reason"].split(":", 1)[0] for f in failures)),
        "source": store.redact(spec), "indexed_in_place": True, "sample_ids": "position",
    }
    with store.atomic_write(store.join(out, INDEX_NAME)) as f:
        f.write(json.dumps(index, indent=1).encode())
    return index


def _display_name(url: str, out: str) -> str:
    """The shard's path relative to OUT when it lies below it, else its base name (its URL says where)."""
    out_path = store.filesystem(out)[1].rstrip("/") + "/"
    path = store.filesystem(url)[1]
    return path[len(out_path):] if path.startswith(out_path) else os.path.basename(path)
