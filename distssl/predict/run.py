"""Predict every part a rank owns, and summarise when all are done.

Part n belongs to rank n mod world, so every sample is predicted exactly once on any number of ranks.
Each part is one Parquet file, ``OUT/parts/part-NNNNNN.parquet``, written atomically (a reader never
sees half of one): a killed run rerun with the same command predicts only the parts without their
file, and a finished one rewrites nothing. Rank 0 writes ``OUT/summary.json`` from the parts (counts,
throughput, agreement with the true labels where known, the predictions' class histogram).
"""
from __future__ import annotations

import io
import json
import time
from collections import Counter
from dataclasses import dataclass
from typing import Optional

import torch

from distssl.data import store
from distssl.data.transforms import normalize
from distssl.predict.model import Predictor
from distssl.predict.parts import Part, part_samples

COLUMNS = ("key", "source", "sha256", "pred", "pred_name", "confidence", "topk_ids", "topk_probs", "true_label")


@dataclass
class PartResult:
    name: str
    rows: int
    unreadable: int
    seconds: float
    written: bool  # False: it was there already


def part_url(out: str, part: Part) -> str:
    return store.join(out, "parts", f"{part.name}.parquet")


def label_map(part_names: list[str], model_names: list[str]) -> Optional[list[int]]:
    """The part's class ids in the model's order, matched by name (None: ids are taken as they are)."""
    if not part_names or not model_names or part_names == model_names:
        return None
    where = {n: i for i, n in enumerate(model_names)}
    return [where.get(n, -1) for n in part_names]


def _decode(predictor: Predictor, data: bytes) -> Optional[torch.Tensor]:
    try:
        return predictor.views.eval(predictor.views.eval_image(data))
    except Exception:  # an undecodable image: counted, never fatal
        return None


@torch.no_grad()
def predict_part(predictor: Predictor, part: Part, out: str, batch_size: int, topk: int,
                 device: torch.device) -> PartResult:
    import pyarrow as pa
    import pyarrow.parquet as pq

    start = time.perf_counter()
    names = predictor.class_names
    mapping = label_map(part.class_names, names)
    k = min(topk, int(predictor.meta["num_classes"]))
    cols: dict[str, list] = {c: [] for c in COLUMNS}
    unreadable, pending = 0, []

    def flush():
        x = normalize(torch.stack([t for _, t in pending]).to(device), predictor.mean, predictor.std)
        probs = (predictor.model(x).float() / predictor.temperature).softmax(dim=1).cpu()
        top = probs.topk(k, dim=1)
        for (s, _), ids, ps in zip(pending, top.indices.tolist(), top.values.tolist()):
            label = s.true_label if mapping is None or s.true_label < 0 else (
                mapping[s.true_label] if s.true_label < len(mapping) else -1)
            for c, v in (("key", s.key), ("source", s.source), ("sha256", s.sha256), ("pred", ids[0]),
                         ("pred_name", names[ids[0]] if ids[0] < len(names) else str(ids[0])),
                         ("confidence", ps[0]), ("topk_ids", ids), ("topk_probs", ps),
                         ("true_label", label if label >= 0 else None)):
                cols[c].append(v)
        pending.clear()

    for s in part_samples(part):
        img = _decode(predictor, s.data) if s.data is not None else None
        if img is None:
            unreadable += 1
            continue
        pending.append((s, img))
        if len(pending) == batch_size:
            flush()
    if pending:
        flush()
    schema = pa.schema([("key", pa.string()), ("source", pa.string()), ("sha256", pa.string()),
                        ("pred", pa.int32()), ("pred_name", pa.string()), ("confidence", pa.float32()),
                        ("topk_ids", pa.list_(pa.int32())), ("topk_probs", pa.list_(pa.float32())),
                        ("true_label", pa.int32())])
    table = pa.table(cols, schema=schema).replace_schema_metadata({"unreadable": str(unreadable)})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    with store.atomic_write(part_url(out, part)) as f:
        f.write(buf.getvalue())
    return PartResult(part.name, table.num_rows, unreadable, time.perf_counter() - start, True)


def predict_parts(predictor: Predictor, parts: list[Part], out: str, rank: int, world: int, batch_size: int,
                  topk: int, device: torch.device, progress: bool = True) -> list[PartResult]:
    from tqdm import tqdm

    mine = [p for p in parts if p.number % world == rank]
    results = []
    bar = tqdm(total=len(mine), desc=f"predict rank {rank}" if world > 1 else "predict", unit="part",
               disable=not progress, position=rank if world > 1 else None)
    images, started = 0, time.perf_counter()
    for part in mine:
        if store.exists(part_url(out, part)):  # finished by an earlier launch: kept as it is
            results.append(PartResult(part.name, 0, 0, 0.0, False))
        else:
            r = predict_part(predictor, part, out, batch_size, topk, device)
            results.append(r)
            images += r.rows
        bar.update(1)
        bar.set_postfix({"img/s": f"{images / max(time.perf_counter() - started, 1e-9):.0f}"})
    bar.close()
    return results


def summarise(out: str, parts: list[Part], class_names: list[str], seconds: float, images_this_launch: int,
              spec: str, model: str) -> dict:
    """summary.json from every part's file (only its pred, confidence and true_label columns)."""
    import pyarrow.parquet as pq

    rows, unreadable, agree, known, hist = 0, 0, 0, 0, Counter()
    confidence_sum = 0.0
    for part in parts:
        fs, path = store.filesystem(part_url(out, part))
        with fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            unreadable += int((pf.schema_arrow.metadata or {}).get(b"unreadable", b"0"))
            t = pf.read(columns=["pred", "confidence", "true_label"])
        preds, truth = t.column("pred").to_pylist(), t.column("true_label").to_pylist()
        rows += len(preds)
        hist.update(preds)
        confidence_sum += sum(t.column("confidence").to_pylist())
        for p, y in zip(preds, truth):
            if y is not None:
                known += 1
                agree += p == y
    summary = {
        "model": model, "data": spec, "parts": len(parts), "predicted": rows, "unreadable": unreadable,
        "with_true_label": known, "agreement": agree / known if known else None,
        "mean_confidence": confidence_sum / rows if rows else None,
        "class_histogram": {(class_names[c] if c < len(class_names) else str(c)): n for c, n in sorted(hist.items())},
        "seconds_this_launch": round(seconds, 2),
        "img_per_s_this_launch": round(images_this_launch / seconds, 1) if seconds > 0 else None,
    }
    with store.atomic_write(store.join(out, "summary.json")) as f:
        f.write(json.dumps(summary, indent=1).encode())
    return summary
