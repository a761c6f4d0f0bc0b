"""Launched by tests/test_invariance.py (deepspeed launcher, 1 or 2 ranks): the same global batches
through Trainer.train_step; writes each step's global loss and p_model as JSON."""
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # the launcher adds it
    out_json, overrides = args[0], args[1:]
    from distssl.config import load_config
    from distssl.engine import Trainer, init_distributed
    from distssl.models import fill_input_defaults

    cfg = load_config(os.path.join(os.path.dirname(__file__), "..", "..", "configs", "demo.yaml"), overrides)
    fill_input_defaults(cfg)
    rank, world, local_rank = init_distributed(5)
    trainer = Trainer(cfg, rank, world, local_rank)
    B, mu, size = cfg.train.batch_size, cfg.ssl.mu, cfg.data.image_size
    per, uper = B // world, B * mu // world
    records = []
    for step in range(int(os.environ.get("INVARIANCE_STEPS", "4"))):
        g = torch.Generator().manual_seed(1000 + step)  # the global batch of this step, the same for any world
        x = torch.randint(0, 256, (B, 3, size, size), dtype=torch.uint8, generator=g)
        y = torch.randint(0, cfg.model.num_classes, (B,), generator=g)
        weak = torch.randint(0, 256, (B * mu, 3, size, size), dtype=torch.uint8, generator=g)
        strong = torch.randint(0, 256, (B * mu, 3, size, size), dtype=torch.uint8, generator=g)
        lb = {"x": x[rank * per:(rank + 1) * per], "y": y[rank * per:(rank + 1) * per]}
        ub = {"weak": weak[rank * uper:(rank + 1) * uper], "strong": strong[rank * uper:(rank + 1) * uper],
              "y_true": torch.full((uper,), -1)}
        stats = trainer.train_step(lb, ub)
        loss = trainer._sum_over_ranks([stats["loss"]])[0].item() / world
        records.append({"loss": loss, "p_model": trainer.da.p_model.tolist()})
    if rank == 0:
        with open(out_json, "w") as f:
            json.dump(records, f)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
