"""What a run saves and how it resumes: one complete checkpoint of every rank (DeepSpeed's files; each
rank's :class:`RunState`, EMA, algorithm state and RNG; the world-size-independent state of
distssl.checkpoint.elastic), resumed on the same ranks, or on another number of ranks and loader
readers (then the data continues from every old reader's position, distssl.data.position).

The engine, the EMA and the algorithm are passed in: this module knows what it saves of them, not
where a trainer keeps them."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from distssl.checkpoint import elastic
from distssl.checkpoint import layout as ckpt
from distssl.config import ConfigError
from distssl.data.position import StreamPlan
from distssl.distributed.collectives import barrier

log = logging.getLogger("distssl")
STREAMS = ("labeled", "unlabeled")
# (stream, the plan it had, the saved readers' cursors, how many readers saved them) -> the plan
# that continues where they stopped, for this launch's readers (TrainStream.replan)
Replan = Callable[[str, StreamPlan, dict[int, int], int], StreamPlan]


@dataclass
class RunState:
    """Where a run is between two steps, beyond the weights: saved by every rank, restored on resume."""
    readers: int  # this launch's loader readers per stream (ranks x loader workers)
    step: int = 0  # optimizer steps taken
    # samples each reader (by global worker number) has consumed of its stream's sequence
    cursors: dict[str, dict[int, int]] = field(default_factory=lambda: {s: {} for s in STREAMS})
    # what a run with another reader count left unread, to be read first
    plans: dict[str, StreamPlan] = field(default_factory=lambda: {s: StreamPlan() for s in STREAMS})
    skipped_total: int = 0  # unusable samples skipped so far, over all ranks

    def to_saved(self) -> dict:
        # not the readers: they are the launch's (the checkpoint's COMPLETE marker records the saving one's)
        return {"step": self.step, "skipped_total": self.skipped_total,
                "cursors": {k: {str(w): c for w, c in v.items()} for k, v in self.cursors.items()},
                "plans": {k: p.to_json() for k, p in self.plans.items()}}

    @classmethod
    def from_saved(cls, saved: dict, readers: int) -> "RunState":
        return cls(readers=readers, step=int(saved["step"]), skipped_total=int(saved["skipped_total"]),
                   cursors={k: {int(w): int(c) for w, c in saved["cursors"].get(k, {}).items()} for k in STREAMS},
                   plans={k: StreamPlan.from_json(saved["plans"].get(k)) for k in STREAMS})


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

    def save(self, run: RunState, engine, ema, algorithm, augment=None) -> None:
        """Collective: one complete checkpoint of every rank (tmp_step_N, renamed and marked COMPLETE
        by rank 0), with the state gathered whole for an elastic resume."""
        tmp_tag = f"tmp_{ckpt.tag_for(run.step)}"
        engine.save_checkpoint(str(self.folder), tag=tmp_tag, save_latest=False)
        ckpt.save_rank_state(ckpt.rank_state_path(self.folder, tmp_tag, self.rank),
                             {**run.to_saved(), "ema": ema.state_dict(), "algorithm": algorithm.state_dict(),
                              **({"augment": augment.state_dict()} if augment is not None else {}),
                              "torch_rng": torch.get_rng_state(), "world_size": self.world})
        elastic.save(self.folder / tmp_tag / elastic.ELASTIC_NAME,
                     elastic.gather(engine, ema, engine.lr_scheduler, run.step))
        barrier()
        if self.rank == 0:
            ckpt.finalize(self.folder, tmp_tag, run.step,
                          {"world_size": self.world, "readers": run.readers, "zero_stage": self.zero_stage},
                          self.keep)
        barrier()

    def resume(self, run: RunState, engine, ema, algorithm, replan: Replan, seed: int,
               global_batch: int, augment=None) -> Optional[RunState]:
        """The newest complete checkpoint loaded into ``engine``, ``ema``, ``algorithm`` and ``augment``
        (CTAugment's policy, or None); returns its run state (``run`` is the fresh one of this launch),
        or None when there is none."""
        found = ckpt.latest(self.folder)
        if found is None:
            return None
        _, tag, info = found
        old_world = int(info["world_size"])
        old_readers = int(info["readers"])
        if old_world != self.world or old_readers != run.readers:
            return self._resume_elastic(run, tag, old_world, old_readers, engine, ema, algorithm, replan, seed,
                                        global_batch, augment)
        engine.load_checkpoint(str(self.folder), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True)
        saved = ckpt.load_rank_state(ckpt.rank_state_path(self.folder, tag, self.rank))
        ema.load_state_dict(saved["ema"])
        _load_algorithm(algorithm, saved)
        _load_augment(augment, saved)
        torch.set_rng_state(saved["torch_rng"])
        return RunState.from_saved(saved, run.readers)

    def _resume_elastic(self, run: RunState, tag: str, old_world: int, old_readers: int, engine, ema, algorithm,
                        replan: Replan, seed: int, global_batch: int, augment=None) -> RunState:
        """Resume what ``old_world`` ranks (``old_readers`` loader readers per stream) saved on this
        launch's: weights, optimizer state, EMA, the algorithm's state and the lr schedule exactly
        (elastic.pt), and each stream's position as a plan that reads the rest of the interrupted
        epoch once."""
        where = self.folder / tag
        state = elastic.load(where / elastic.ELASTIC_NAME)
        elastic.restore(engine, ema, engine.lr_scheduler, state)
        old = [ckpt.load_rank_state(ckpt.rank_state_path(self.folder, tag, r)) for r in range(old_world)]
        _load_algorithm(algorithm, old[0])  # the same on every rank: its updates are global
        _load_augment(augment, old[0])  # likewise
        resumed = RunState(readers=run.readers, step=int(state["step"]), skipped_total=int(old[0]["skipped_total"]))
        for which in STREAMS:
            cursors = {int(w): int(c) for saved in old for w, c in saved["cursors"].get(which, {}).items()}
            try:
                resumed.plans[which] = replan(which, StreamPlan.from_json(old[0]["plans"].get(which)), cursors,
                                              old_readers)
            except ValueError as e:
                raise ConfigError(f"data.{which}: {e}") from None
        engine.global_steps = resumed.step
        engine.global_samples = resumed.step * global_batch
        # dropout / drop-path masks after this point differ from an uninterrupted run; views do not
        torch.manual_seed(seed * 1_000_003 + resumed.step * 131 + self.rank)
        if self.rank == 0:
            log.warning("resumed %s on %d ranks x %d loader readers (saved by %d x %d): weights, optimizer state, "
                        "EMA, the algorithm's state and the lr schedule exactly; the data from where every reader "
                        "stopped, the rest of the interrupted epoch read once", where, self.world,
                        run.readers // self.world, old_world, old_readers // old_world)
        return resumed


def _load_algorithm(algorithm, saved: dict) -> None:
    try:
        algorithm.load_state_dict(saved["algorithm"])
    except ValueError as e:
        raise ConfigError(f"ssl.algorithm: {e}: resume with the same algorithm") from None


def _load_augment(augment, saved: dict) -> None:
    """CTAugment's policy, when this run learns one: from the checkpoint, which must have it."""
    if augment is None:
        if "augment" in saved:
            raise ConfigError("data.strong_aug: the checkpoint was saved by a run with CTAugment; resume with "
                              "data.strong_aug=ctaugment, or start a new run.out_dir")
        return
    if "augment" not in saved:
        raise ConfigError("data.strong_aug=ctaugment: the checkpoint was saved by a run with RandAugment; resume "
                          "with data.strong_aug=randaugment, or start a new run.out_dir")
    try:
        augment.load_state_dict(saved["augment"])
    except ValueError as e:
        raise ConfigError(f"data.ctaugment: {e}") from None
