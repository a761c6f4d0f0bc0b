"""What a run saves and how it resumes: one complete checkpoint of every rank — DeepSpeed's files for the engine,
and a dict of the run's stateful objects (torchtitan's CheckpointManager), each with ``state_dict`` /
``load_state_dict`` — plus the world-size-independent state of distssl.checkpoint.elastic; resumed on the same
ranks, or on another number of ranks and loader readers.

The objects are named by the caller (``run``, ``feed``, ``ema``, ``algorithm``, a component ...): this module
saves whatever it is given, and knows only how an elastic resume treats two of them — the EMA comes whole from
``elastic.pt``, the feed continues from every old reader's position (``Feed.replan``) — and that an object
with ``enabled_by`` (the setting that brings it) may not be gained or lost between launches.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from distssl.checkpoint import elastic
from distssl.checkpoint import layout as ckpt
from distssl.config import ConfigError
from distssl.distributed.collectives import barrier

log = logging.getLogger("distssl")
# an optional object (CTAugment) says which setting brings it, as ``enabled_by``; a checkpoint records it, so
# a resume that would gain or lose the object (and change what the run is) is refused naming that setting
ENABLED_BY = "enabled_by"


@dataclass
class RunState:
    """Where a run is between two steps, beyond what its components hold: saved by every rank."""
    step: int = 0  # optimizer steps taken
    skipped_total: int = 0  # unusable samples skipped so far, over all ranks

    def state_dict(self) -> dict:
        return {"step": self.step, "skipped_total": self.skipped_total}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.skipped_total = int(state["step"]), int(state["skipped_total"])


def by_name(saved: dict) -> dict:
    """A rank's saved state by object name; checkpoints written before the objects were named kept the run state
    and the streams' positions flat."""
    if "run" in saved:
        return saved
    legacy = {"augment": "data.strong_aug=ctaugment"} if "augment" in saved else {}  # the one optional object then
    return {**saved, ENABLED_BY: legacy, "run": {"step": saved["step"], "skipped_total": saved["skipped_total"]},
            "feed": {"cursors": saved.get("cursors", {}), "plans": saved.get("plans", {})}}


def _load(obj, state: dict) -> None:
    try:
        obj.load_state_dict(state)
    except ValueError as e:  # the object's own message names the setting that differs and the fix
        raise ConfigError(str(e)) from None


def _enabled_by(stateful: dict) -> dict:
    return {name: getattr(obj, "enabled_by") for name, obj in stateful.items() if hasattr(obj, "enabled_by")}


def _check_presence(stateful: dict, saved: dict) -> None:
    """Refuse a resume that gains or loses an optional object, naming the setting that brings it."""
    recorded = saved.get(ENABLED_BY, {})
    for name in saved:
        if name not in stateful and name not in RESERVED:
            key = recorded.get(name, name)
            raise ConfigError(f"{key}: the checkpoint was saved by a run with it; resume with {key}, "
                              "or start a new run.out_dir")
    for name, key in _enabled_by(stateful).items():
        if name not in saved:
            raise ConfigError(f"{key}: the checkpoint was saved by a run without it; resume without it, "
                              "or start a new run.out_dir")


RESERVED = {"torch_rng", "world_size", ENABLED_BY, "cursors", "plans", "step", "skipped_total"}


@dataclass(frozen=True)
class Checkpoints:
    """A run's checkpoints folder as one rank of this launch saves into and resumes from it."""
    folder: Path
    rank: int
    world: int
    zero_stage: int
    keep: int  # train.keep_checkpoints

    def path(self, step: int) -> Path:
        return self.folder / ckpt.tag_for(step)

    def save(self, step: int, engine, ema, stateful: dict, readers: int) -> None:
        """Collective: one complete checkpoint of every rank (tmp_step_N, renamed and marked COMPLETE by rank 0):
        the engine, every object of ``stateful``, the RNG, and the state gathered whole for an elastic resume.
        ``readers``: this launch's loader readers per stream (recorded, to tell an elastic resume)."""
        tmp_tag = f"tmp_{ckpt.tag_for(step)}"
        engine.save_checkpoint(str(self.folder), tag=tmp_tag, save_latest=False)
        ckpt.save_rank_state(ckpt.rank_state_path(self.folder, tmp_tag, self.rank),
                             {**{name: obj.state_dict() for name, obj in stateful.items()},
                              ENABLED_BY: _enabled_by(stateful), "torch_rng": torch.get_rng_state(),
                              "world_size": self.world})
        elastic.save(self.folder / tmp_tag / elastic.ELASTIC_NAME,
                     elastic.gather(engine, ema, engine.lr_scheduler, step))
        barrier()
        if self.rank == 0:
            ckpt.finalize(self.folder, tmp_tag, step,
                          {"world_size": self.world, "readers": readers, "zero_stage": self.zero_stage}, self.keep)
        barrier()

    def resume(self, engine, ema, stateful: dict, readers: int, seed: int, global_batch: int) -> Optional[int]:
        """The newest complete checkpoint loaded into ``engine`` and every object of ``stateful`` (``run``: the
        RunState, ``feed``, ``ema`` among them); returns its step, or None when there is none."""
        found = ckpt.latest(self.folder)
        if found is None:
            return None
        _, tag, info = found
        old_world, old_readers = int(info["world_size"]), int(info["readers"])
        if old_world != self.world or old_readers != readers:
            return self._resume_elastic(tag, old_world, old_readers, engine, ema, stateful, readers, seed,
                                        global_batch)
        engine.load_checkpoint(str(self.folder), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True)
        saved = by_name(ckpt.load_rank_state(ckpt.rank_state_path(self.folder, tag, self.rank)))
        _check_presence(stateful, saved)
        for name, obj in stateful.items():
            _load(obj, saved[name])
        torch.set_rng_state(saved["torch_rng"])
        return stateful["run"].step

    def _resume_elastic(self, tag: str, old_world: int, old_readers: int, engine, ema, stateful: dict, readers: int,
                        seed: int, global_batch: int) -> int:
        """Resume what ``old_world`` ranks (``old_readers`` loader readers per stream) saved on this launch's:
        weights, optimizer state, EMA and the lr schedule exactly (elastic.pt), the objects' state as rank 0 saved
        it (an algorithm's updates are global: the same on every rank), and the feed's position as a plan that
        reads the rest of the interrupted epoch once."""
        where = self.folder / tag
        state = elastic.load(where / elastic.ELASTIC_NAME)
        elastic.restore(engine, ema, engine.lr_scheduler, state)
        old = [by_name(ckpt.load_rank_state(ckpt.rank_state_path(self.folder, tag, r))) for r in range(old_world)]
        _check_presence(stateful, old[0])
        for name, obj in stateful.items():
            if name == "ema":
                continue  # restored whole from elastic.pt
            if name == "feed":
                try:
                    obj.replan([o["feed"] for o in old], old_readers)
                except ValueError as e:
                    raise ConfigError(str(e)) from None
                continue
            _load(obj, old[0][name])
        run = stateful["run"]
        run.step = int(state["step"])
        engine.global_steps = run.step
        engine.global_samples = run.step * global_batch
        # dropout / drop-path masks after this point differ from an uninterrupted run; views do not
        torch.manual_seed(seed * 1_000_003 + run.step * 131 + self.rank)
        if self.rank == 0:
            log.warning("resumed %s on %d ranks x %d loader readers (saved by %d x %d): weights, optimizer state, "
                        "EMA, the algorithm's state and the lr schedule exactly; the data from where every reader "
                        "stopped, the rest of the interrupted epoch read once", where, self.world,
                        readers // self.world, old_world, old_readers // old_world)
        return run.step
