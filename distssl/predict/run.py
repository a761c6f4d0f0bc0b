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
from typing import Iterator, Optional

import torch

from distssl.data import store
from distssl.data.transforms import normalize
from distssl.predict.model import Predictor
from distssl.predict.parts import Part, Sample, part_samples

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
def forward_part(predictor: Predictor, part: Part, batch_size: int, device: torch.device,
                 skipped: list) -> Iterator[tuple[list[Sample], torch.Tensor]]:
    """(samples, their logits on the CPU) a batch at a time; undecodable samples are appended to ``skipped``."""
    pending: list[tuple[Sample, torch.Tensor]] = []

    def run():
        x = normalize(torch.stack([t for _, t in pending]).to(device), predictor.mean, predictor.std)
        out = ([s for s, _ in pending], predictor.model(x).float().cpu())
        pending.clear()
        return out

    for s in part_samples(part):
        img = _decode(predictor, s.data) if s.data is not None else None
        if img is None:
            skipped.append(s)
            continue
        pending.append((s, img))
        if len(pending) == batch_size:
            yield run()
    if pending:
        yield run()


def predict_part(predictor: Predictor, part: Part, out: str, batch_size: int, topk: int,
                 device: torch.device) -> PartResult:
    import pyarrow as pa
    import pyarrow.parquet as pq

    start = time.perf_counter()
    names = predictor.class_names
    mapping = label_map(part.class_names, names)
    k = min(topk, int(predictor.meta["num_classes"]))
    cols: dict[str, list] = {c: [] for c in COLUMNS}
    skipped: list = []
    for samples, logits in forward_part(predictor, part, batch_size, device, skipped):
        top = (logits / predictor.temperature).softmax(dim=1).topk(k, dim=1)
        for s, ids, ps in zip(samples, top.indices.tolist(), top.values.tolist()):
            label = model_label(s.true_label, mapping)
            for c, v in (("key", s.key), ("source", s.source), ("sha256", s.sha256), ("pred", ids[0]),
                         ("pred_name", names[ids[0]] if ids[0] < len(names) else str(ids[0])),
                         ("confidence", ps[0]), ("topk_ids", ids), ("topk_probs", ps),
                         ("true_label", label if label >= 0 else None)):
                cols[c].append(v)
    schema = pa.schema([("key", pa.string()), ("source", pa.string()), ("sha256", pa.string()),
                        ("pred", pa.int32()), ("pred_name", pa.string()), ("confidence", pa.float32()),
                        ("topk_ids", pa.list_(pa.int32())), ("topk_probs", pa.list_(pa.float32())),
                        ("true_label", pa.int32())])
    table = pa.table(cols, schema=schema).replace_schema_metadata(
        {"unreadable": str(len(skipped)), "temperature": repr(predictor.temperature)})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    with store.atomic_write(part_url(out, part)) as f:
        f.write(buf.getvalue())
    return PartResult(part.name, table.num_rows, len(skipped), time.perf_counter() - start, True)


def model_label(label: int, mapping: Optional[list[int]]) -> int:
    """A sample's true label in the model's class order (-1: unknown, or a class the model lacks)."""
    if mapping is None or label < 0:
        return label
    return mapping[label] if label < len(mapping) else -1


def labeled_logits(predictor: Predictor, parts: list[Part], batch_size: int, device: torch.device
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, labels in the model's order) of every sample of ``parts`` that has a true label."""
    logits, labels = [], []
    for part in parts:
        mapping = label_map(part.class_names, predictor.class_names)
        for samples, out in forward_part(predictor, part, batch_size, device, []):
            ys = torch.tensor([model_label(s.true_label, mapping) for s in samples])
            keep = ys >= 0
            logits.append(out[keep])
            labels.append(ys[keep])
    if not logits or sum(len(y) for y in labels) == 0:
        raise ValueError("the calibration set has no sample with a true label (a cls, or a label the model knows)")
    return torch.cat(logits), torch.cat(labels)


def check_temperature(out: str, parts: list[Part], temperature: float) -> None:
    """A part already written with another temperature would mix two calibrations in one output: refuse."""
    import pyarrow.parquet as pq

    for part in parts:
        url = part_url(out, part)
        if not store.exists(url):
            continue
        fs, path = store.filesystem(url)
        with fs.open(path, "rb") as f:
            saved = float((pq.ParquetFile(f).schema_arrow.metadata or {}).get(b"temperature", b"1.0"))
        if abs(saved - temperature) > 1e-9 * max(1.0, temperature):
            raise ValueError(f"{store.redact(url)} was predicted at temperature {saved:.6g}, this launch's is "
                             f"{temperature:.6g}: rerun with the same --calibrate-on (or none), or give a new --out")
        return  # one part says what the launch that wrote them used


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
              spec: str, model: str, calibration: Optional[dict] = None) -> dict:
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
        "calibration": calibration,
    }
    with store.atomic_write(store.join(out, "summary.json")) as f:
        f.write(json.dumps(summary, indent=1).encode())
    return summary
