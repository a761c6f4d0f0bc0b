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

from distssl.data.transforms import normalize
from distssl.distributed.preempt import ignore_in_worker
from distssl.outliers import prototype_scores
from distssl.predict.model import Predictor
from distssl.predict.parts import Part, Sample, part_samples
from distssl.ssl.open_set import outlier_scores, split_outputs
from distssl.storage import store
from distssl.tracking.progress import bar as progress_bar

COLUMNS = ("key", "source", "sha256", "pred", "pred_name", "confidence", "topk_ids", "topk_probs", "true_label",
           "outlier_score", "unknown")


@dataclass
class PartResult:
    name: str
    rows: int
    unreadable: int
    seconds: float
    written: bool  # False: it was there already


OPTIONAL = ("outlier_score", "unknown")  # columns parts written before them lack: read as null


def read_part(out: str, part: Part, columns: list[str]) -> list[dict]:
    """Part n's prediction rows, only ``columns`` (an optional column a part lacks reads as None)."""
    import pyarrow.parquet as pq

    fs, path = store.filesystem(part_url(out, part))
    with fs.open(path, "rb") as f:
        table = pq.read_table(f)
    have = [c for c in columns if c in table.column_names]
    missing = [c for c in columns if c not in have]
    if any(c not in OPTIONAL for c in missing):
        raise ValueError(f"{part_url(out, part)} has no column {missing[0]}: predict it again")
    rows = table.select(have).to_pylist()
    for r in rows:
        r.update(dict.fromkeys(missing))
    return rows


def part_url(out: str, part: Part) -> str:
    return store.join(out, "parts", f"{part.name}.parquet")


def label_map(part_names: list[str], model_names: list[str]) -> Optional[list[int]]:
    """The part's class ids in the model's order, matched by name (None: ids are taken as they are)."""
    if not part_names or not model_names or part_names == model_names:
        return None
    where = {n: i for i, n in enumerate(model_names)}
    return [where.get(n, -1) for n in part_names]


@dataclass
class DecodedBatch:
    """Up to a batch of one part's samples, decoded and eval-transformed (uint8), in a worker or in the
    process: ``samples`` without their bytes, ``x`` None when none decoded, ``last`` on a part's final one."""
    part: int
    samples: list[Sample]
    x: Optional[torch.Tensor]
    skipped: int
    last: bool


def decoded_batches(views, part: Part, batch_size: int) -> Iterator[DecodedBatch]:
    """``part``'s samples a batch at a time; an undecodable image is counted in ``skipped``, never fatal."""
    samples, images, skipped = [], [], 0
    for s in part_samples(part):
        img = None
        if s.data is not None:
            try:
                img = views.eval(views.eval_image(s.data))
            except Exception:
                img = None
        if img is None:
            skipped += 1
            continue
        samples.append(Sample(s.key, s.source, None, s.true_label, s.sha256))
        images.append(img)
        if len(images) == batch_size:
            yield DecodedBatch(part.number, samples, torch.stack(images), skipped, False)
            samples, images, skipped = [], [], 0
    yield DecodedBatch(part.number, samples, torch.stack(images) if images else None, skipped, True)


class PartBatches(torch.utils.data.IterableDataset):
    """The decoded batches of ``parts``; with loader workers, worker w decodes parts w, w + W, ... whole."""

    def __init__(self, views, parts: list[Part], batch_size: int):
        self.views, self.parts, self.batch_size = views, parts, batch_size

    def __iter__(self) -> Iterator[DecodedBatch]:
        info = torch.utils.data.get_worker_info()
        w, n = (info.id, info.num_workers) if info is not None else (0, 1)
        for part in self.parts[w::n]:
            yield from decoded_batches(self.views, part, self.batch_size)


def batches_of(predictor: Predictor, parts: list[Part], batch_size: int, workers: int) -> Iterator[DecodedBatch]:
    """Decoded batches of ``parts``, in this process (``workers`` 0) or in up to ``workers`` loader
    processes (each a part at a time: a part's batches arrive in order, parts interleaved)."""
    dataset = PartBatches(predictor.views, parts, batch_size)
    workers = min(workers, len(parts))
    if workers == 0:
        return iter(dataset)

    return iter(torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers, prefetch_factor=4,
                                            collate_fn=lambda b: b, worker_init_fn=ignore_in_worker))


@torch.no_grad()
def outputs_of(predictor: Predictor, x: torch.Tensor, device: torch.device
               ) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(the class logits, the outlier head's one-vs-all logits, the pooled features): the last two None when the
    model has no outlier head; the head is not run where the export's prototypes make the score."""
    x = normalize(x.to(device, non_blocking=True), predictor.mean, predictor.std)
    if predictor.outlier_head is None:
        return predictor.model(x).float().cpu(), None, None
    model = predictor.model
    pooled = model.forward_head(model.forward_features(x), pre_logits=True)
    ova = None
    if predictor.prototypes is None:
        ova = split_outputs(predictor.outlier_head(pooled), int(predictor.meta["num_classes"]))[0].float().cpu()
    return model.get_classifier()(pooled).float().cpu(), ova, pooled.float().cpu()


class PartRows:
    """One part's output rows as they come, then its Parquet file (atomically)."""

    def __init__(self, predictor: Predictor, part: Part, topk: int):
        self.predictor, self.part = predictor, part
        self.mapping = label_map(part.class_names, predictor.class_names)
        self.k = min(topk, int(predictor.meta["num_classes"]))
        self.cols: dict[str, list] = {c: [] for c in COLUMNS}
        self.skipped, self.started = 0, time.perf_counter()

    def add(self, samples: list[Sample], logits: torch.Tensor, ova: Optional[torch.Tensor] = None,
            pooled: Optional[torch.Tensor] = None) -> None:
        """With an outlier head, each row's outlier_score: the distance of its ``pooled`` features from the nearest
        class prototype where the export has them (distssl.outliers), else IOMatch's sum_k p_k p_out(k) of the
        calibrated p from the head's ``ova`` logits; ``unknown``: whether it reaches the export's threshold
        (both null without an outlier head)."""
        names = self.predictor.class_names
        probs = (logits / self.predictor.temperature).softmax(dim=1)
        top = probs.topk(self.k, dim=1)
        if self.predictor.prototypes is not None and pooled is not None:
            scores = prototype_scores(pooled, self.predictor.prototypes).tolist()
        elif ova is not None:
            scores = outlier_scores(probs, ova).tolist()
        else:
            scores = [None] * len(samples)
        at = self.predictor.unknown_at
        for s, ids, ps, score in zip(samples, top.indices.tolist(), top.values.tolist(), scores):
            label = model_label(s.true_label, self.mapping)
            for c, v in (("key", s.key), ("source", s.source), ("sha256", s.sha256), ("pred", ids[0]),
                         ("pred_name", names[ids[0]] if ids[0] < len(names) else str(ids[0])),
                         ("confidence", ps[0]), ("topk_ids", ids), ("topk_probs", ps),
                         ("true_label", label if label >= 0 else None), ("outlier_score", score),
                         ("unknown", None if score is None else score >= at)):
                self.cols[c].append(v)

    def write(self, out: str) -> PartResult:
        import pyarrow as pa
        import pyarrow.parquet as pq

        schema = pa.schema([("key", pa.string()), ("source", pa.string()), ("sha256", pa.string()),
                            ("pred", pa.int32()), ("pred_name", pa.string()), ("confidence", pa.float32()),
                            ("topk_ids", pa.list_(pa.int32())), ("topk_probs", pa.list_(pa.float32())),
                            ("true_label", pa.int32()), ("outlier_score", pa.float32()), ("unknown", pa.bool_())])
        table = pa.table(self.cols, schema=schema).replace_schema_metadata(
            {"unreadable": str(self.skipped), "temperature": repr(self.predictor.temperature)})
        buf = io.BytesIO()
        pq.write_table(table, buf)
        with store.atomic_write(part_url(out, self.part)) as f:
            f.write(buf.getvalue())
        return PartResult(self.part.name, table.num_rows, self.skipped, time.perf_counter() - self.started, True)


def model_label(label: int, mapping: Optional[list[int]]) -> int:
    """A sample's true label in the model's class order (-1: unknown, or a class the model lacks)."""
    if mapping is None or label < 0:
        return label
    return mapping[label] if label < len(mapping) else -1


def labeled_outputs(predictor: Predictor, parts: list[Part], batch_size: int, device: torch.device, output: int = 0,
                    workers: int = 0, cap_per_class: Optional[int] = None, cap: Optional[int] = None
                    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """One of :func:`outputs_of`'s outputs (0 logits, 2 pooled features) and the labels in the model's order, batch
    by batch, of the samples of ``parts`` that have a true label; reading stops once every class has
    ``cap_per_class`` of them, or ``cap`` in all."""
    outs, labels = [], []
    maps = {p.number: label_map(p.class_names, predictor.class_names) for p in parts}
    counts = torch.zeros(int(predictor.meta["num_classes"]), dtype=torch.long)
    for b in batches_of(predictor, parts, batch_size, workers):
        if b.x is None:
            continue
        ys = torch.tensor([model_label(s.true_label, maps[b.part]) for s in b.samples])
        keep = ys >= 0
        if cap_per_class is not None:
            keep &= counts[ys.clamp(min=0)] < cap_per_class
        if keep.any():
            outs.append(outputs_of(predictor, b.x[keep], device)[output])
            labels.append(ys[keep])
            counts += torch.bincount(ys[keep], minlength=len(counts))
        if (cap_per_class is not None and bool((counts >= cap_per_class).all())) or \
                (cap is not None and int(counts.sum()) >= cap):
            break
    return outs, labels


def labeled_logits(predictor: Predictor, parts: list[Part], batch_size: int, device: torch.device,
                   workers: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, labels in the model's order) of every sample of ``parts`` that has a true label."""
    logits, labels = labeled_outputs(predictor, parts, batch_size, device, 0, workers)
    if not logits:
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
                  topk: int, device: torch.device, progress: bool = True, workers: int = 0) -> list[PartResult]:
    """Predict this rank's parts that have no file yet (``workers`` loader processes decode them)."""
    mine = [p for p in parts if p.number % world == rank]
    todo = [p for p in mine if not store.exists(part_url(out, p))]
    left = {p.number for p in todo}
    results = [PartResult(p.name, 0, 0, 0.0, False) for p in mine if p.number not in left]  # an earlier launch's
    bar = progress_bar(total=len(mine), initial=len(results), desc=f"predict rank {rank}" if world > 1 else "predict",
               unit="part", disable=not progress, position=rank if world > 1 else None)
    by_number = {p.number: p for p in todo}
    open_parts: dict[int, PartRows] = {}
    images, started = 0, time.perf_counter()
    for b in batches_of(predictor, todo, batch_size, workers):
        rows = open_parts.setdefault(b.part, PartRows(predictor, by_number[b.part], topk))
        if b.x is not None:
            rows.add(b.samples, *outputs_of(predictor, b.x, device))
            images += len(b.samples)
        rows.skipped += b.skipped
        if b.last:
            results.append(open_parts.pop(b.part).write(out))
            bar.update(1)
        bar.set_postfix({"img/s": f"{images / max(time.perf_counter() - started, 1e-9):.0f}"}, refresh=False)
    bar.close()
    return results


def summarise(out: str, parts: list[Part], class_names: list[str], seconds: float, images_this_launch: int,
              spec: str, model: str, calibration: Optional[dict] = None, outlier_head: bool = False) -> dict:
    """summary.json from every part's file (only its pred, confidence, true_label and unknown columns)."""
    import pyarrow.parquet as pq

    rows, unreadable, agree, known, unknown, hist = 0, 0, 0, 0, 0, Counter()
    confidence_sum = 0.0
    for part in parts:
        fs, path = store.filesystem(part_url(out, part))
        with fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            unreadable += int((pf.schema_arrow.metadata or {}).get(b"unreadable", b"0"))
            t = pf.read(columns=["pred", "confidence", "true_label"] + [c for c in ("unknown",)
                                                                      if c in pf.schema_arrow.names])
        preds, truth = t.column("pred").to_pylist(), t.column("true_label").to_pylist()
        if "unknown" in t.column_names:
            unknown += sum(bool(u) for u in t.column("unknown").to_pylist())
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
        # images the model's outlier head names outside the label set (null: the model has no such head)
        "unknown": unknown if outlier_head else None,
        "mean_confidence": confidence_sum / rows if rows else None,
        "class_histogram": {(class_names[c] if c < len(class_names) else str(c)): n for c, n in sorted(hist.items())},
        "seconds_this_launch": round(seconds, 2),
        "img_per_s_this_launch": round(images_this_launch / seconds, 1) if seconds > 0 else None,
        "calibration": calibration,
    }
    with store.atomic_write(store.join(out, "summary.json")) as f:
        f.write(json.dumps(summary, indent=1).encode())
    return summary
