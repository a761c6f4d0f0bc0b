#!/usr/bin/env python
"""FixMatch step vs supervised step, images/s of ResNet-50 at 224 px in bf16 on one GPU.

The same three real-engine steps as tools/bench/step.py (shared_bn, the default: weak view without
gradients; concat, FixMatch's reference step; a supervised step over the same B + 2muB images), on CUDA
with bf16 autocast and
channels_last. Without a GPU it says so and exits 0 (a skip, not a failure).

  python tools/bench/gpu_step.py [--quick] [--profile] [--batch B] [--mu MU] [--model resnet50] [--size 224]

Ends with: RESULT gpu_step_ratio=... gpu_step_vs_concat=... gpu_shared_bn_img_s=... gpu_supervised_img_s=...
"""
from __future__ import annotations

import argparse
import sys
import tempfile


def profile_variants(variants: dict, rounds: int = 3) -> None:
    """GPU busy time per step (kernel time summed) against the step's wall time: where the step is
    not the GPU's work, it is the host's (Python, launches, synchronisation)."""
    import time

    import torch
    from torch.profiler import ProfilerActivity, profile

    for name in ("shared_bn", "concat", "supervised"):
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            t0 = time.perf_counter()
            for _ in range(rounds):
                variants[name]()
            torch.cuda.synchronize()
            wall = (time.perf_counter() - t0) / rounds
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        busy = sum(e.time_range.elapsed_us() for e in kernels) / rounds / 1e3
        print(f"\nprofile {name}: {wall * 1e3:.1f} ms per step under the profiler, GPU busy {busy:.1f} ms, "
              f"{len(kernels) / rounds:.0f} kernels per step")
        for key in ("self_device_time_total", "self_cuda_time_total"):
            try:
                print(prof.key_averages().table(sort_by=key, row_limit=12, max_name_column_width=60))
                break
            except Exception:  # noqa: BLE001 (the sort key's name differs between torch versions)
                continue


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a short run (under a minute)")
    p.add_argument("--steps", type=int, help="timed rounds (default 20, 5 with --quick)")
    p.add_argument("--batch", type=int, default=32, help="labeled batch B per GPU (default 32)")
    p.add_argument("--mu", type=int, default=5, help="unlabeled ratio (default 5, FixMatch's ImageNet setting)")
    p.add_argument("--model", default="resnet50")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--profile", action="store_true",
                   help="after timing, profile 3 steps of each variant: GPU busy time per step and the top kernels")
    args = p.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print("gpu_step: no CUDA GPU on this machine: skipped (run it on a GPU node)")
        return 0
    import os
    os.environ["DS_ACCELERATOR"] = "cuda"
    from step import measure

    from common import result, table

    steps = args.steps or (5 if args.quick else 20)
    # The trainer is built on the demo's shards, so the head has their 10 classes (1000 would add
    # 2M of ResNet-50's 25M parameters: the step's cost is the backbone's).
    with tempfile.TemporaryDirectory() as tmp:
        overrides = [f"run.out_dir={tmp}/run", f"train.batch_size={args.batch}", f"ssl.mu={args.mu}",
                     f"model.name={args.model}", f"data.image_size={args.size}",
                     "train.precision=bf16", "train.channels_last=true", "train.num_workers=0",
                     "data.mean=[0.485,0.456,0.406]", "data.std=[0.229,0.224,0.225]"]
        med = measure(overrides, steps, warmup=3, sync=torch.cuda.synchronize,
                      then=profile_variants if args.profile else None)
    n = med["images"]
    name = torch.cuda.get_device_name()
    print(f"{name}; {args.model} at {args.size} px, bf16 autocast, channels_last, B={args.batch}, mu={args.mu}: "
          f"{n} images per step (synthetic), 10-class head, median of {steps} rounds\n")
    names = {"shared_bn": "shared_bn (default)", "concat": "concat (reference)", "supervised": "supervised"}
    table([(names[k], f"{med[k] * 1000:.1f}", f"{n / med[k]:.0f}") for k in ("shared_bn", "concat", "supervised")],
          ("step", "ms", "img/s"))
    result(gpu_step_ratio=med["shared_bn"] / med["supervised"], gpu_step_vs_concat=med["shared_bn"] / med["concat"],
           gpu_shared_bn_img_s=n / med["shared_bn"], gpu_concat_img_s=n / med["concat"],
           gpu_supervised_img_s=n / med["supervised"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
