"""Pseudo-labeled shard sets: the confident predictions of a prediction run become a labeled set.

Part n's chosen rows (distssl-predict --to-shards: confidence >= P; distssl-selftrain: its class-balanced
selection, a row possibly several times) become shard n of DST, written by the rank that owns part n: the
image bytes exactly as read, ``cls`` the prediction, and a ``json`` that keeps the provenance (teacher,
confidence, source, key, sha256, the true label when the sample had one, and the soft target if any). A
shard is complete when its stats file exists (the builder's rule); ``index.json`` comes last, from
every shard's stats, so the set is usable as ``data.labeled`` (alone, or weighted beside the human
labels) only once it is whole.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Optional

from distssl.data.index import FORMAT, INDEX_NAME
from distssl.predict.parts import Part, part_samples
from distssl.predict.rank_parts import read_part
from distssl.shards.writer import tar_writer
from distssl.storage import store


def shard_name(part: Part) -> str:
    return f"shard-{part.number:06d}.tar"


def _stats_url(dst: str, part: Part) -> str:
    return store.join(dst, f"shard-{part.number:06d}.stats.json")


def shard_done(dst: str, part: Part) -> bool:
    """Shard ``part.number`` of DST is complete (its stats file is written last)."""
    return store.exists(_stats_url(dst, part))


@dataclass
class PseudoRow:
    """One chosen prediction: its class, confidence, how many times it enters the set (class balancing
    duplicates a rare class's), its soft target (``{"ids": [...], "probs": [...]}``) and true label if known."""
    cls: int
    confidence: float
    copies: int = 1
    soft: Optional[dict] = None
    true_label: Optional[int] = None


def confident_rows(out: str, part: Part, min_confidence: float) -> tuple[dict[tuple[str, str], PseudoRow], int]:
    """(part n's predictions at confidence >= P by (key, source), how many it predicted): distssl-predict
    --to-shards. An image the model's outlier head names unknown is left out, however confident its class."""
    rows = read_part(out, part, ["key", "source", "pred", "confidence", "true_label", "unknown"])
    return {(r["key"], r["source"]): PseudoRow(r["pred"], r["confidence"], true_label=r["true_label"])
            for r in rows if r["confidence"] >= min_confidence and not r["unknown"]}, len(rows)


def write_pseudo_shard(dst: str, part: Part, chosen: dict[tuple[str, str], PseudoRow], teacher: str,
                       predicted: int) -> dict:
    """Shard ``part.number`` of DST from the ``chosen`` rows of part n (each ``copies`` times, under keys of its
    own); its stats (a shard with stats is not written again)."""
    try:
        return store.read_json(_stats_url(dst, part), "remove it and rerun: the shard beside it is written again")
    except FileNotFoundError:
        pass
    count, hist = 0, {}
    with store.atomic_write(store.join(dst, shard_name(part))) as f, tar_writer(f) as tar:
        for s in part_samples(part):
            row = chosen.get((s.key, s.source))
            if row is None or s.data is None:
                continue
            ext = _image_ext(s.data)
            meta = {"teacher": teacher, "confidence": row.confidence, "source": s.source, "source_key": s.key,
                    "sha256": s.sha256, **({"true_label": row.true_label} if row.true_label is not None else {}),
                    **({"soft": row.soft} if row.soft is not None else {})}
            for copy in range(row.copies):
                tar.write({"__key__": f"{part.number:06d}{count:06d}", ext: s.data, "cls": str(row.cls).encode(),
                           "json": json.dumps({**meta, **({"copy": copy} if copy else {})}, sort_keys=True).encode()})
                count += 1
            hist[row.cls] = hist.get(row.cls, 0) + row.copies
    fs, path = store.filesystem(store.join(dst, shard_name(part)))
    stats = {"name": shard_name(part), "count": count, "bytes": int(fs.info(path)["size"]),
             "class_counts": {str(k): v for k, v in sorted(hist.items())}, "predicted": predicted}
    store.write_bytes(_stats_url(dst, part), json.dumps(stats, sort_keys=True).encode())
    return stats


def _image_ext(data: bytes) -> str:
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return "jpg"  # what the stream tries first; PIL reads the bytes whatever they are


def write_pseudo_index(dst: str, parts: list[Part], class_names: list[str], info: dict) -> Optional[dict]:
    """index.json from every shard's stats (None while a shard is missing its stats); ``info`` (teacher, data,
    min_confidence, ...) is kept under ``pseudo_labels`` with the count predicted."""
    stats = []
    for part in parts:
        try:
            stats.append(store.read_json(_stats_url(dst, part), "remove it and rerun"))
        except FileNotFoundError:
            return None
    hist = [0] * len(class_names)
    for st in stats:
        for k, v in st["class_counts"].items():
            if int(k) < len(hist):
                hist[int(k)] += v
    kept = [st for st in stats if st["count"] > 0]
    index = {"format": FORMAT, "count": sum(st["count"] for st in kept), "labeled": True,
             "num_classes": len(class_names) or None, "class_names": class_names, "class_histogram": hist,
             "shards": [{"name": st["name"], "count": st["count"], "bytes": st["bytes"]} for st in kept],
             "bytes": sum(st["bytes"] for st in kept), "failures": [], "num_failures": 0,
             "pseudo_labels": {**info, "predicted": sum(st["predicted"] for st in stats)}}
    with store.atomic_write(store.join(dst, INDEX_NAME)) as f:
        f.write(json.dumps(index, indent=1).encode())
    return index
