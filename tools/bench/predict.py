#!/usr/bin/env python
"""Prediction throughput per process against the eval loop, over the same images in one run.

One shard set of photo-like JPEGs (scikit-learn's two photos cut at ImageNet's sizes, 500x375), one
model with random weights exported as a run exports it, then, interleaved round by round:
  predict     distssl.predict.rank_parts.predict_parts: decode + eval transform in the process, the forward,
              and the Parquet part per shard (key, sha256, top-k, written atomically)
  eval        the trainer's eval input path over the same shards (EvalStream + the eval transform,
              decoded in the process: train.num_workers=0) and the same forward, counting top-1
  predict_w   the same prediction with --workers loader processes decoding (distssl-predict --workers)
  eval_w      the same eval loop with --workers loader processes (what a run's eval gets)
Medians of the rounds. Both sides use the same batch size and device.

  python tools/bench/predict.py [--quick] [--count N] [--model NAME] [--size PX] [--batch B] [--workers W]

Ends with: RESULT predict_img_s=... eval_img_s=... predict_vs_eval=predict/eval (same decode path:
the cost of the Parquet output, hashing and the part bookkeeping) predict_workers_img_s=...
predict_vs_eval_workers=predict_w/eval_w
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="240 images, 64 px, test_resnet, 2 rounds (< 1 min)")
    p.add_argument("--count", type=int, default=1200)
    p.add_argument("--model", default="resnet18")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--workers", type=int, default=2, help="loader processes of the eval_w side")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--device", default="cuda" if __import__("torch").cuda.is_available() else "cpu")
    a = p.parse_args()
    if a.quick:
        a.count, a.model, a.size, a.rounds = 240, "test_resnet", 64, 2

    import timm
    import torch

    from common import machine, photo_jpegs, result, table
    from distssl.data.index import resolve
    from distssl.data.samples import eval_item
    from distssl.data.streams import EvalStream, loader
    from distssl.data.transforms import normalize
    from distssl.models.export import model_meta, write_export
    from distssl.predict.model import load_predictor
    from distssl.predict.parts import make_parts
    from distssl.predict.rank_parts import predict_parts
    from distssl.shards import make_shards

    device = torch.device(a.device)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        photo_jpegs(tmp / "raw", a.count)
        make_shards(str(tmp / "raw"), str(tmp / "shards"), max_count=100, progress=False)
        torch.manual_seed(0)
        model = timm.create_model(a.model, num_classes=10)
        mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
        write_export(model.state_dict(), model_meta(a.model, 10, a.size, mean, std, [f"c{i}" for i in range(10)],
                                                    crop_pct=0.875, interpolation="bilinear", run="bench/predict",
                                                    step=0), tmp / "model")
        predictor = load_predictor(str(tmp / "model"), device)
        parts = make_parts(str(tmp / "shards"))
        shards = resolve(str(tmp / "shards"))

        def predict(r: int, workers: int) -> float:
            start = time.perf_counter()
            res = predict_parts(predictor, parts, str(tmp / f"pred{r}-{workers}"), 0, 1, a.batch, 5, device,
                                progress=False, workers=workers)
            return sum(x.rows for x in res) / (time.perf_counter() - start)

        @torch.no_grad()
        def evaluate(workers: int) -> float:
            stream = EvalStream(shards, rank=0, world_size=1, batch_size=a.batch,
                                make_item=eval_item(predictor.views))
            start, seen, hits = time.perf_counter(), 0, 0
            for batch in loader(stream, workers):
                if "x" not in batch:
                    continue
                x = normalize(batch["x"].to(device), predictor.mean, predictor.std)
                hits += int((predictor.model(x).argmax(1).cpu() == batch["y"]).sum())
                seen += batch["y"].numel()
            return seen / (time.perf_counter() - start)

        runs: dict[str, list[float]] = {"predict": [], "eval": [], "predict_w": [], "eval_w": []}
        evaluate(0)  # warm-up: first forward, page cache
        for r in range(a.rounds):
            runs["predict"].append(predict(r, 0))
            runs["eval"].append(evaluate(0))
            runs["predict_w"].append(predict(r, a.workers))
            runs["eval_w"].append(evaluate(a.workers))
    med = {k: statistics.median(v) for k, v in runs.items()}
    print(f"{machine()}, {device}; {a.count} JPEGs 500x375 -> {a.size} px, {a.model}, batch {a.batch}, "
          f"{a.rounds} rounds (medians)")
    table([(k, f"{v:.1f}", " ".join(f"{x:.0f}" for x in runs[k])) for k, v in med.items()],
          ("path", "img/s", "rounds"))
    result(predict_img_s=med["predict"], eval_img_s=med["eval"], predict_vs_eval=med["predict"] / med["eval"],
           predict_workers_img_s=med["predict_w"], eval_workers_img_s=med["eval_w"],
           predict_vs_eval_workers=med["predict_w"] / med["eval_w"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
