"""Launched by tests/test_optimizers.py (deepspeed launcher, 2 ranks): for each NAME/zeroN of $CASES,
the optimizer that distssl builds (timm's factory, layer-decay groups) wrapped by DeepSpeed, against the
same optimizer stepping the same model alone on the whole batch. Each rank takes half of every global
batch; DeepSpeed averages the gradients, so the weights must agree.
Rank 0 writes {"NAME/zeroN": {"max_diff": float, "moved": float, "groups": int}} as JSON."""
import copy
import json
import os
import sys

import deepspeed
import timm
import torch
import torch.distributed as dist

from distssl.config import load_config
from distssl.distributed.peers import init_distributed
from distssl.train.optim import build_optimizer, deepspeed_config


def model() -> torch.nn.Module:
    torch.manual_seed(0)  # the same initial weights on every rank and for the reference
    return timm.create_model("test_vit", num_classes=10, img_size=32, patch_size=8)


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    out_json = args[0]
    rank, world, _ = init_distributed(5)
    results = {}
    for case in os.environ["CASES"].split(","):  # NAME/zeroN
        name, stage = case.split("/zero")
        stage = int(stage)
        cfg = load_config(os.path.join(os.path.dirname(__file__), "..", "..", "configs", "demo.yaml"),
                          [f"optim.name={name}", "optim.lr=0.01", "optim.weight_decay=0.05",
                           "optim.layer_decay=0.75", "train.steps=3", f"deepspeed.zero_stage={stage}"])
        reference = model()
        ref_opt, ref_sched = build_optimizer(reference, cfg)
        net = copy.deepcopy(reference)
        opt, sched = build_optimizer(net, cfg)
        ds = deepspeed_config(cfg, micro_batch=4, world=world)
        engine, *_ = deepspeed.initialize(model=net, optimizer=opt, lr_scheduler=sched, config=ds)
        for step in range(3):
            g = torch.Generator().manual_seed(step)
            x, y = torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)
            mine = slice(rank * 4, rank * 4 + 4)
            loss = torch.nn.functional.cross_entropy(engine(x[mine]), y[mine])
            engine.backward(loss)
            engine.step()
            ref_opt.zero_grad()
            torch.nn.functional.cross_entropy(reference(x), y).backward()
            ref_opt.step()
            ref_sched.step()  # as engine.step() steps the schedule
        diff = moved = 0.0
        with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), enabled=stage == 3):
            for (n, p), (_, q), (_, p0) in zip(engine.module.named_parameters(), reference.named_parameters(),
                                               model().named_parameters()):
                diff = max(diff, (p.detach().float() - q.detach()).abs().max().item())
                moved = max(moved, (q.detach() - p0.detach()).abs().max().item())
        results[f"{name}/zero{stage}"] = {"max_diff": diff, "moved": moved, "groups": len(opt.param_groups),
                                          "type": type(opt).__name__}
        engine.destroy()
    if rank == 0:
        with open(out_json, "w") as f:
            json.dump(results, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
