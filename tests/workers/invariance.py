"""Launched by tests/test_invariance.py (deepspeed launcher, 1 or 2 ranks): the same global batches
through Trainer.train_step, for each algorithm of $INVARIANCE_ALGORITHMS in turn (on the same engine);
writes each step's global loss, p_model and the algorithm's state as JSON."""
import dataclasses
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
    from distssl import ssl as algorithms

    records = []
    names = os.environ.get("INVARIANCE_ALGORITHMS", "fixmatch").split(",")
    steps = int(os.environ.get("INVARIANCE_STEPS", "4"))
    for k in range(steps * len(names)):
        step, name = k % steps, names[k // steps]
        if step == 0:  # the next algorithm, fresh, on the engine as the previous one left it
            trainer.algorithm = algorithms.build(dataclasses.replace(cfg.ssl, algorithm=name), cfg.model.num_classes,
                                                 trainer.da, num_unlabeled=B * mu * steps)
        g = torch.Generator().manual_seed(1000 + k)  # the global batch of this step, the same for any world
        x = torch.randint(0, 256, (B, 3, size, size), dtype=torch.uint8, generator=g)
        y = torch.randint(0, cfg.model.num_classes, (B,), generator=g)
        weak = torch.randint(0, 256, (B * mu, 3, size, size), dtype=torch.uint8, generator=g)
        strong = torch.randint(0, 256, (B * mu, 3, size, size), dtype=torch.uint8, generator=g)
        lb = {"x": x[rank * per:(rank + 1) * per], "y": y[rank * per:(rank + 1) * per]}
        ids = torch.arange(B * mu) + step * B * mu  # each sample's stable id (FlexMatch's per-sample state)
        ub = {"weak": weak[rank * uper:(rank + 1) * uper], "strong": strong[rank * uper:(rank + 1) * uper],
              "y_true": torch.full((uper,), -1), "idx": ids[rank * uper:(rank + 1) * uper]}
        stats = trainer.train_step(lb, ub)
        loss = trainer._sum_over_ranks([stats["loss"]])[0].item() / world
        state = {key: v.float().flatten().tolist() for key, v in trainer.algorithm.state_dict().items()
                 if isinstance(v, torch.Tensor)}
        records.append({"algorithm": name, "loss": loss, "p_model": trainer.da.p_model.tolist(), "state": state})
    if rank == 0:
        with open(out_json, "w") as f:
            json.dump(records, f)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
