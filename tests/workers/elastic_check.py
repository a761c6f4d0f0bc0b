"""Launched by tests/test_elastic.py (deepspeed launcher, any number of ranks): resume a run's newest
checkpoint into this launch's engine, gather the state whole again and compare it with what was saved
(elastic.pt), and each rank's algorithm state with the one saved by rank 0. Rank 0 writes
{"exact": bool, "differs": [...], "step": N, "p_model": [...], "algorithm_state": {key: [numel, sum]}} as JSON."""
import json

import torch

from common import trainer_from_argv


def main() -> None:
    out_json, cfg, rank, world, trainer = trainer_from_argv()
    from distssl.checkpoint import elastic
    from distssl.checkpoint import layout as ckpt

    step = trainer.resume()
    _, tag, _ = ckpt.latest(trainer.ckpt_dir)
    again = elastic.gather(trainer.engine, trainer.ema, trainer.scheduler, trainer.step)
    saved_alg = ckpt.load_rank_state(ckpt.rank_state_path(trainer.ckpt_dir, tag, 0))["algorithm"]
    now_alg = trainer.algorithm.state_dict()
    alg_differs = [f"algorithm.{k} on rank {rank}" for k in saved_alg
                   if torch.is_tensor(saved_alg[k]) and not torch.equal(saved_alg[k], now_alg.get(k))]
    every_rank: list = [None] * world
    torch.distributed.all_gather_object(every_rank, alg_differs)  # the state is the same on every rank
    if rank == 0:
        saved = elastic.load(trainer.ckpt_dir / tag / elastic.ELASTIC_NAME)
        differs = [d for rank_differs in every_rank for d in rank_differs]
        parts = [(p, saved[p], again[p]) for p in ("params", "buffers", "ema", "ema_buffers")]
        saved_opt, again_opt = elastic.optimizer_state(saved), elastic.optimizer_state(again)
        if set(saved_opt) != set(again_opt):
            differs.append(f"optimizer state keys {sorted(saved_opt)} != {sorted(again_opt)}")
        parts += [(f"optimizer.{k}", saved_opt[k], again_opt.get(k, {})) for k in saved_opt]
        for part, a, b in parts:
            if set(a) != set(b):
                differs.append(f"{part}: names")
            differs += [f"{part}.{k}" for k in a if k in b and not torch.equal(a[k], b[k])]
        scalars = (saved["optimizer_scalars"], again["optimizer_scalars"])
        if {k: float(v) for k, v in scalars[0].items()} != {k: float(v) for k, v in scalars[1].items()}:
            differs.append(f"optimizer scalars {scalars}")
        if saved["scheduler"]["last_epoch"] != again["scheduler"]["last_epoch"]:
            differs.append("scheduler")
        with open(out_json, "w") as f:
            json.dump({"exact": not differs, "differs": differs[:10], "step": step,
                       "p_model": None if getattr(trainer.da, "p_model", None) is None else trainer.da.p_model.tolist(),
                       "optimizer_state": {k: len(v) for k, v in saved_opt.items()},
                       "algorithm_state": {k: [saved_alg[k].numel(), float(saved_alg[k].double().sum())]
                                           for k in saved_alg if torch.is_tensor(saved_alg[k])}},
                      f)
    torch.distributed.barrier()  # every rank leaves together, through the process group's own teardown
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
