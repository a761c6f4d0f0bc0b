#!/usr/bin/env python
"""The cost of one FixMatch step, measured side by side in one run on the real engine.

Three steps over the same images (B labeled, muB weak, muB strong), each a real
``Trainer.train_step`` in a 1-rank DeepSpeed ZeRO-2 world:
  shared_bn   train.weak_forward=shared_bn (the default): cat(labeled, strong) forwarded with
              gradients, then the weak view without gradients, normalised with the BatchNorm
              statistics that forward used
  concat      train.weak_forward=concat (FixMatch's reference step): cat(labeled, weak, strong)
              forwarded with gradients, so its backward runs through the weak view too
  supervised  a supervised step over B + 2muB labeled images (the cost floor of "one step over
              these images with gradients")
plus distribution alignment's own time per step (p_model update + alignment).

  python tools/bench/step.py [--quick] [--steps N] [--batch B] [--mu MU] [--model NAME] [--size PX]

Ends with: RESULT step_ratio=shared_bn/supervised step_vs_concat=shared_bn/concat
concat_step_ratio=concat/supervised da_overhead=DA/concat ...
boundary_allreduce_overhead=(the per-step all-reduce that carries the preemption flag)/shared_bn
Accuracy of the two steps on the demo: docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def make_trainer(overrides: list[str]):
    """A real Trainer (DeepSpeed engine, EMA, DA) in a world of one; data resolves to the demo shards."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from distssl.config import load_config
    from distssl.distributed.peers import init_distributed
    from distssl.models.factory import fill_input_defaults
    from distssl.shards.demo import ensure_demo_data
    from distssl.train.trainer import Trainer

    cfg = load_config(str(ROOT / "configs/demo.yaml"), overrides)
    cfg.data.demo_root = str(ROOT / cfg.data.demo_root)
    for key in ("labeled", "unlabeled", "eval"):
        setattr(cfg.data, key, str(ROOT / getattr(cfg.data, key)))
    ensure_demo_data(cfg.data.demo_root, progress=False)
    fill_input_defaults(cfg)
    rank, world, local_rank = init_distributed(5)
    return Trainer(cfg, rank, world, local_rank)


def synthetic_batches(B: int, mu: int, size: int, classes: int, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    img = lambda n: torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)  # noqa: E731
    lb = {"x": img(B), "y": torch.randint(0, classes, (B,), generator=g)}
    ub = {"weak": img(mu * B), "strong": img(mu * B), "y_true": torch.full((mu * B,), -1)}
    sup = {"x": img(B + 2 * mu * B), "y": torch.randint(0, classes, (B + 2 * mu * B,), generator=g)}
    if torch.cuda.is_available():  # the trainer's loader hands over page-locked batches on a GPU machine
        lb, ub, sup = ({k: v.pin_memory() for k, v in b.items()} for b in (lb, ub, sup))
    return lb, ub, sup


def measure(overrides: list[str], steps: int, warmup: int = 2, sync=lambda: None, then=None) -> dict:
    """Median seconds per step of each variant, interleaved round by round so drift hits all alike.
    ``then(variants)``, if given, runs after the timing with the same trainer (e.g. a profiler)."""
    import torch

    trainer = make_trainer(overrides)
    cfg = trainer.cfg
    B, mu = cfg.train.batch_size, cfg.ssl.mu
    lb, ub, sup = synthetic_batches(B, mu, cfg.data.image_size, cfg.model.num_classes)

    def shared_bn():
        cfg.train.weak_forward = "shared_bn"
        trainer.train_step(lb, ub)

    def concat():
        cfg.train.weak_forward = "concat"
        trainer.train_step(lb, ub)

    def supervised():
        trainer.train_step(sup, None)

    probs = torch.softmax(torch.randn(mu * B, cfg.model.num_classes, device=trainer.device), dim=1)

    def da():
        for _ in range(10):
            trainer.da(probs)

    variants = {"shared_bn": shared_bn, "concat": concat, "supervised": supervised, "da_x10": da}
    times: dict[str, list[float]] = {k: [] for k in variants}
    for i in range(warmup + steps):
        for name, fn in variants.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    if then is not None:
        then(variants)
    med = {k: statistics.median(v) for k, v in times.items()}
    med["da"] = med.pop("da_x10") / 10
    med["images"] = B + 2 * mu * B
    return med


def _allreduce_worker(rank: int, port: int, rounds: int, out) -> None:
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    flags = torch.zeros(2)
    times = []
    for i in range(rounds + 20):
        t0 = time.perf_counter()
        dist.all_reduce(flags)
        if i >= 20:
            times.append(time.perf_counter() - t0)
    if rank == 0:
        out.put(statistics.median(times))
    dist.destroy_process_group()


def boundary_allreduce_seconds(rounds: int = 300) -> float:
    """The step-boundary all-reduce (skipped samples + the preemption flag: 2 floats) between two
    gloo processes on this machine, median seconds."""
    import torch.multiprocessing as mp

    import common  # noqa: F401 - tests/ on the path
    from support.servers import free_port

    ctx = mp.get_context("spawn")
    out, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=_allreduce_worker, args=(r, port, rounds, out)) for r in range(2)]
    for proc in procs:
        proc.start()
    seconds = out.get(timeout=120)
    for proc in procs:
        proc.join()
    return seconds


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a short run (under a minute)")
    p.add_argument("--steps", type=int, help="timed rounds (default 20, 6 with --quick)")
    p.add_argument("--batch", type=int, default=16, help="labeled batch B (default 16)")
    p.add_argument("--mu", type=int, default=7)
    p.add_argument("--model", default="test_resnet")
    p.add_argument("--size", type=int, default=64,
                   help="image size in pixels (default 64; at 32 px a 0.4M-parameter model is bound by per-step "
                        "fixed costs rather than by the images)")
    args = p.parse_args(argv)
    steps = args.steps or (6 if args.quick else 20)
    from common import machine, result, table

    with tempfile.TemporaryDirectory() as tmp:
        overrides = [f"run.out_dir={tmp}/run", f"train.batch_size={args.batch}", f"ssl.mu={args.mu}",
                     f"model.name={args.model}", f"data.image_size={args.size}", "train.num_workers=0"]
        med = measure(overrides, steps)
    n = med["images"]
    print(f"{machine()}; {args.model} at {args.size} px, B={args.batch}, mu={args.mu}: {n} images per step, "
          f"median of {steps} interleaved rounds\n")
    names = {"shared_bn": "shared_bn (default)", "concat": "concat (reference)", "supervised": "supervised",
             "da": "DA"}
    table([(names[k], f"{med[k] * 1000:.1f}", f"{n / med[k]:.0f}" if k != "da" else "-")
           for k in ("shared_bn", "concat", "supervised", "da")], ("step", "ms", "img/s"))
    print("\nshared_bn: weak view without gradients, normalised with the gradient forward's BatchNorm statistics; "
          "concat: cat(labeled, weak, strong) with gradients")
    boundary = boundary_allreduce_seconds()
    print(f"step-boundary all-reduce (skipped count + preemption flag, 2 gloo ranks): {boundary * 1e6:.0f} us, "
          f"{100 * boundary / med['shared_bn']:.2f}% of the shared_bn step")
    result(step_ratio=med["shared_bn"] / med["supervised"], step_vs_concat=med["shared_bn"] / med["concat"],
           concat_step_ratio=med["concat"] / med["supervised"], da_overhead=med["da"] / med["concat"],
           shared_bn_ms=med["shared_bn"] * 1000, concat_ms=med["concat"] * 1000,
           supervised_ms=med["supervised"] * 1000, boundary_allreduce_overhead=boundary / med["shared_bn"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
