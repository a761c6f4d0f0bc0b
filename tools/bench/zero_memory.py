#!/usr/bin/env python
"""Per-rank bytes of training state (parameters + gradients + optimizer state) under ZeRO stages 0-3,
2 ranks, measured on real DeepSpeed engines at the peak of the second step (after backward, after update).

Each rank walks every tensor the engine holds (module parameters and their ZeRO-3 partitions,
gradients, the ZeRO optimizer's flat fp32/bf16 groups and partitions, the inner optimizer's state),
counts each storage once, and rank 0 reports the maximum over ranks. Two precisions:
  fp32   what the CPU/autocast configs use (fp32 weights)
  bf16   DeepSpeed's bf16 module (bf16 weights and grads, fp32 master copy), the usual GPU setting

  python tools/bench/zero_memory.py [--quick] [--model NAME]

Ends with: RESULT zero3_state_ratio=stage3/stage0 (bf16) zero3_state_ratio_fp32=... zero1_... zero2_...
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


# Communication scratch (reduce/all-gather buckets) is sized by the config, not by the model: not state.
SCRATCH = ("bucket", "ipg", "pin_buffer", "comm")


def _storages(obj, seen: dict, path: str = "", depth: int = 0) -> None:
    """Every tensor storage reachable from obj (lists, dicts, tuples, attributes of ZeRO optimizers),
    each counted once, with the first path that reached it."""
    import torch

    if depth > 6 or obj is None:
        return
    if isinstance(obj, torch.Tensor):
        if obj.device.type == "meta":
            return
        st = obj.untyped_storage()
        if st.nbytes() and st.data_ptr() not in seen:
            seen[st.data_ptr()] = (st.nbytes(), path)
        if isinstance(obj, torch.nn.Parameter):
            for attr in ("grad", "ds_tensor"):
                _storages(getattr(obj, attr, None), seen, f"{path}.{attr}", depth + 1)
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            _storages(v, seen, f"{path}[{k!r:.20}]", depth + 1)
    elif isinstance(obj, (list, tuple, set)):
        for i, v in enumerate(obj):
            _storages(v, seen, f"{path}[{i}]", depth + 1)
    elif hasattr(obj, "__dict__") and type(obj).__module__.startswith(("deepspeed", "torch.optim")):
        for k, v in vars(obj).items():
            if not any(s in k.lower() for s in SCRATCH):
                _storages(v, seen, f"{path}.{k}", depth + 1)


def worker(stage: int, precision: str, model_name: str, out: str) -> None:
    """One rank: build the engine, take one step, report the bytes it holds."""
    import deepspeed
    import deepspeed.ops
    import timm
    import torch
    import torch.distributed as dist

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    model = timm.create_model(model_name, num_classes=10)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    cfg = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
           "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True,
           "bf16": {"enabled": precision == "bf16"}, "steps_per_print": 10 ** 9}
    if stage == 3:  # partition every parameter (DeepSpeed otherwise keeps small ones whole on every rank)
        cfg["zero_optimization"].update(stage3_param_persistence_threshold=0, stage3_max_live_parameters=0,
                                        stage3_max_reuse_distance=0, stage3_prefetch_bucket_size=0)
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    dtype = next(engine.module.parameters()).dtype
    x = torch.randn(2, 3, 32, 32, dtype=dtype)
    peak = 0
    for step in range(2):  # the second step has momentum buffers; measure after backward and after step
        engine.backward(engine(x).float().square().mean())
        for when in ("backward", "step"):
            if when == "step":
                engine.step()
            seen: dict = {}
            _storages(list(engine.module.parameters()), seen, "params")
            _storages(optimizer, seen, "optimizer")
            total = sum(n for n, _ in seen.values())
            if step == 1 and os.environ.get("ZERO_MEMORY_DEBUG") and dist.get_rank() == 0:
                for nbytes, path in sorted(seen.values(), reverse=True)[:8]:
                    print(f"stage {stage} {precision} after {when}: {nbytes:>12,} {path}", file=sys.stderr)
            peak = max(peak, total) if step == 1 else peak
    mine = torch.tensor([float(peak)])
    dist.all_reduce(mine, op=dist.ReduceOp.MAX)
    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters())
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps({"bytes": mine.item(), "params": n_params}))
    dist.barrier()


def run_stage(stage: int, precision: str, model_name: str, tmp: str) -> dict:
    import common  # noqa: F401 - tests/ on the path
    from support.servers import deepspeed_command, launch_env

    out = Path(tmp) / f"z{stage}_{precision}.json"
    cmd = deepspeed_command(__file__, ["--worker", stage, "--precision", precision, "--model", model_name,
                                       "--out", out])
    r = subprocess.run(cmd, capture_output=True, text=True, env=launch_env(), timeout=600)
    if r.returncode != 0:
        raise SystemExit(f"ZeRO-{stage} {precision} worker failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    return json.loads(out.read_text())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="stages 0 and 3 only (under a minute)")
    p.add_argument("--model", default="test_vit", help="timm model (default test_vit: no BatchNorm, so bf16 "
                                                       "modules run on CPU)")
    p.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    p.add_argument("--precision", default="bf16", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker is not None:
        worker(args.worker, args.precision, args.model, args.out)
        return 0

    from common import machine, result, table

    stages = (0, 3) if args.quick else (0, 1, 2, 3)
    precisions = ("bf16",) if args.quick else ("bf16", "fp32")
    got: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for precision in precisions:
            for stage in stages:
                got[(precision, stage)] = run_stage(stage, precision, args.model, tmp)
    n = got[(precisions[0], 0)]["params"]
    print(f"{machine()}; {args.model} ({n:,} parameters), 2 ranks, SGD with momentum; peak of the second "
          f"step (after backward and after the update)\n")
    rows = []
    for (precision, stage), g in got.items():
        base = got[(precision, 0)]["bytes"]
        rows.append((precision, stage, f"{g['bytes'] / 2**20:.2f}", f"{g['bytes'] / n:.1f}",
                     f"{g['bytes'] / base:.3f}"))
    table(rows, ("precision", "ZeRO stage", "MiB per rank", "bytes/param", "vs stage 0"))
    kv = {"zero3_state_ratio": got[("bf16", 3)]["bytes"] / got[("bf16", 0)]["bytes"]}
    for (precision, stage), g in got.items():
        if stage and (precision, stage) != ("bf16", 3):
            kv[f"zero{stage}_state_ratio" + ("" if precision == "bf16" else "_fp32")] = \
                g["bytes"] / got[(precision, 0)]["bytes"]
    result(**kv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
