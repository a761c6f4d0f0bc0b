"""Starting a run: the user's mistakes before any process group, the run folder (its config, its environment,
a resume that would break refused), a finished run read instead of written, then the trainer's loop."""
from __future__ import annotations

import json
import logging
import os
import random
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch.distributed as dist
import yaml

from distssl.checkpoint import layout as ckpt
from distssl.config import Config, ConfigError, dump_yaml, redacted_dict, resume_conflicts, validate
from distssl.distributed.collectives import end_group
from distssl.distributed.peers import init_distributed, write_heartbeat
from distssl.models import export as outputs
from distssl.models.factory import fill_input_defaults
from distssl.tracking import environment
from distssl.train import preflight
from distssl.train.trainer import Trainer

log = logging.getLogger("distssl")


def prepare_out_dir(cfg: Config) -> None:
    """Refuse a resume whose config changed in a way that breaks it; write the resolved config."""


    out = Path(cfg.run.out_dir)
    saved_path = out / "config.yaml"
    if saved_path.exists() and ckpt.complete_tags(out / "checkpoints"):
        conflicts = resume_conflicts(yaml.safe_load(saved_path.read_text()) or {}, cfg)
        if conflicts:
            raise ConfigError(f"run.out_dir={out} holds a run whose config differs in keys that break resuming it: "
                              + "; ".join(conflicts) + ". Use another run.out_dir, or the same values.")


def write_config(cfg: Config) -> None:
    """config.yaml, rewritten only when it changes (a resume with the same config leaves its mtime alone)."""


    path = Path(cfg.run.out_dir) / "config.yaml"
    if path.exists() and path.read_text() == yaml.safe_dump(redacted_dict(cfg), sort_keys=False):
        return
    dump_yaml(cfg, path)


def finished(cfg: Config) -> Optional[dict]:
    """The result of a run that already reached train.steps (summary.json at that step, its export and its
    last checkpoint beside it), else None: a finished run is read, not written."""
    out = Path(cfg.run.out_dir)
    try:
        summary = json.loads((out / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    found = ckpt.latest(out / "checkpoints")
    if summary.get("step") != cfg.train.steps or not (out / outputs.WEIGHTS_NAME).exists() or found is None \
            or found[0] != cfg.train.steps or "top1" not in summary:
        return None
    return summary


def run(cfg: Config, on_eval: Optional[Callable] = None) -> dict:
    """Train (or resume) to ``train.steps``; returns the final eval of the EMA weights.
    ``on_eval(step, metrics, checkpoint_dir)`` runs on every rank after each eval's checkpoint."""
    filled = fill_input_defaults(cfg)
    if filled:
        validate(cfg)  # the values filled in are checked as if the user had given them
        if os.environ.get("RANK", "0") == "0":
            log.warning("from the model's pretrained config: %s", ", ".join(filled))
    label_maps = preflight.check(cfg)  # the user's mistakes, before any process group starts
    prepare_out_dir(cfg)
    done = finished(cfg) if on_eval is None else None  # a restored sweep trial reports its result again instead
    if done is not None:
        if os.environ.get("RANK", "0") == "0":
            print(f"already finished at step {done['step']}: eval top-1 {100 * done['top1']:.2f}% (from "
                  f"{Path(cfg.run.out_dir) / 'summary.json'}); nothing was written", flush=True)
        return {**done, "already_finished": True}
    owns_group = not dist.is_initialized()  # Ray Train brings its own process group: not ours to end
    rank, world, local_rank = init_distributed(cfg.deepspeed.timeout_minutes)
    random.seed(cfg.run.seed + rank)
    np.random.seed(cfg.run.seed + rank)
    if rank == 0:
        write_config(cfg)
        environment.record(cfg.run.out_dir)  # env.json, or what differs from it on a resume
    trainer = Trainer(cfg, rank, world, local_rank, on_eval, label_maps)
    result = trainer.fit()  # on failure no barrier: a dead peer would make the error wait for a second timeout
    write_heartbeat(trainer.out, rank, trainer.step, done=True)  # peers still exporting must not mourn it
    if owns_group:
        end_group()
    return result
