"""Launched by tests/test_invariance.py (deepspeed launcher, 1 or 2 ranks): the same global batches
through Trainer.train_step, for each algorithm of $INVARIANCE_ALGORITHMS in turn (on the same engine);
writes each step's global loss, p_model and the algorithm's state as JSON."""
import dataclasses
import json
import os

import torch

from common import trainer_from_argv


def main() -> None:
    out_json, cfg, rank, world, trainer = trainer_from_argv()
    B, mu, size = cfg.train.batch_size, cfg.ssl.mu, cfg.data.image_size
    per, uper = B // world, B * mu // world
    from distssl import ssl as algorithms
    from distssl.distributed.collectives import sum_numbers

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
        weak_2 = torch.randint(0, 256, (B * mu, 3, size, size), dtype=torch.uint8, generator=g)
        lb = {"x": x[rank * per:(rank + 1) * per], "y": y[rank * per:(rank + 1) * per]}
        # each sample's stable id (per-sample state); with INVARIANCE_OVERLAP=1 half of each step's samples
        # were in the step before, so Temporal Ensembling has targets
        shift = B * mu // 2 if os.environ.get("INVARIANCE_OVERLAP") == "1" else B * mu
        ids = (torch.arange(B * mu) + step * shift) % (B * mu * steps)
        mine = slice(rank * uper, (rank + 1) * uper)
        ub = {"weak": weak[mine], "strong": strong[mine], "weak_2": weak_2[mine],
              "y_true": torch.full((uper,), -1), "idx": ids[mine]}
        stats = trainer.train_step(lb, ub)
        loss = sum_numbers([stats["loss"]], trainer.device)[0].item() / world
        state = {key: v.float().flatten().tolist() for key, v in trainer.algorithm.state_dict().items()
                 if isinstance(v, torch.Tensor)}
        p_model = None if trainer.da.p_model is None else trainer.da.p_model.tolist()  # no DA: consistency methods
        records.append({"algorithm": name, "loss": loss, "p_model": p_model, "state": state})
    if rank == 0:
        with open(out_json, "w") as f:
            json.dump(records, f)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
