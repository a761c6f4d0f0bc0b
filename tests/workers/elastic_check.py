"""Launched by tests/test_elastic.py (deepspeed launcher, any number of ranks): resume a run's newest
checkpoint into this launch's engine, gather the state whole again and compare it with what was saved
(elastic.pt). Rank 0 writes {"exact": bool, "differs": [...], "step": N, "p_model": [...]} as JSON."""
import json
import os
import sys

import torch


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # the launcher adds it
    out_json, overrides = args[0], args[1:]
    from distssl import checkpoint as ckpt
    from distssl import elastic
    from distssl.config import load_config
    from distssl.engine import Trainer, init_distributed
    from distssl.models import fill_input_defaults

    cfg = load_config(os.path.join(os.path.dirname(__file__), "..", "..", "configs", "demo.yaml"), overrides)
    fill_input_defaults(cfg)
    rank, world, local_rank = init_distributed(5)
    trainer = Trainer(cfg, rank, world, local_rank)
    step = trainer.resume()
    _, tag, _ = ckpt.latest(trainer.ckpt_dir)
    again = elastic.gather(trainer.engine, trainer.ema, trainer.scheduler, trainer.step)
    if rank == 0:
        saved = elastic.load(trainer.ckpt_dir / tag / elastic.ELASTIC_NAME)
        differs = []
        for part in ("params", "momentum", "buffers", "ema", "ema_buffers"):
            if set(saved[part]) != set(again[part]):
                differs.append(f"{part}: names")
            differs += [f"{part}.{k}" for k in saved[part] if not torch.equal(saved[part][k], again[part][k])]
        if saved["scheduler"]["last_epoch"] != again["scheduler"]["last_epoch"]:
            differs.append("scheduler")
        with open(out_json, "w") as f:
            json.dump({"exact": not differs, "differs": differs[:10], "step": step,
                       "p_model": trainer.da.p_model.tolist(), "momentum": len(saved["momentum"])}, f)


if __name__ == "__main__":
    main()
