"""Saving and resuming a Trainer: one complete checkpoint of every rank (DeepSpeed's files, each rank's
EMA / DA / algorithm state, RNG and data cursors, and the world-size-independent state of
distssl.elastic), and its resumption, on the same ranks or on another number of ranks and loader
readers (then the data continues from every old reader's position, distssl.data.position)."""
from __future__ import annotations

import logging
from typing import Optional

import torch
import torch.distributed as dist

from distssl import checkpoint as ckpt
from distssl import elastic
from distssl.config import ConfigError
from distssl.data.streams import StreamPlan

log = logging.getLogger("distssl")


def rank_state(tr) -> dict:
    """What each rank saves beside DeepSpeed's files (distssl_rankNNNNN.pt)."""
    return {"step": tr.step, "ema": tr.ema.state_dict(), "da": tr.da.state_dict(),
            "algorithm": tr.algorithm.state_dict(),
            "cursors": {k: {str(w): c for w, c in v.items()} for k, v in tr.cursors.items()},
            "plans": {k: p.to_json() for k, p in tr.plans.items()}, "readers": tr.readers,
            "torch_rng": torch.get_rng_state(),
            "skipped_total": tr.skipped_total, "world_size": tr.world}


def save(tr) -> None:
    """One complete checkpoint of every rank (tmp_step_N, renamed and marked COMPLETE by rank 0), with
    the state gathered whole for an elastic resume."""
    tmp_tag = f"tmp_{ckpt.tag_for(tr.step)}"
    tr.engine.save_checkpoint(str(tr.ckpt_dir), tag=tmp_tag, save_latest=False)
    ckpt.save_rank_state(ckpt.rank_state_path(tr.ckpt_dir, tmp_tag, tr.rank), rank_state(tr))
    # the same state gathered whole, for a resume on another number of ranks (distssl/elastic.py)
    elastic.save(tr.ckpt_dir / tmp_tag / elastic.ELASTIC_NAME,
                 elastic.gather(tr.engine, tr.ema, tr.scheduler, tr.step))
    dist.barrier()
    if tr.rank == 0:
        ckpt.finalize(tr.ckpt_dir, tmp_tag, tr.step,
                      {"world_size": tr.world, "readers": tr.readers,
                       "zero_stage": tr.cfg.deepspeed.zero_stage},
                      tr.cfg.train.keep_checkpoints)
    dist.barrier()


def resume(tr) -> Optional[int]:
    """Load the newest complete checkpoint into ``tr``; returns its step, or None to start fresh."""
    found = ckpt.latest(tr.ckpt_dir)
    if found is None:
        return None
    step, tag, info = found
    old_world = int(info.get("world_size", tr.world))
    old_readers = int(info.get("readers", old_world * max(1, tr.cfg.train.num_workers)))
    if old_world != tr.world or old_readers != tr.readers:
        return _resume_elastic(tr, tag, old_world, old_readers)
    tr.engine.load_checkpoint(str(tr.ckpt_dir), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True)
    state = ckpt.load_rank_state(ckpt.rank_state_path(tr.ckpt_dir, tag, tr.rank))
    tr.step = int(state["step"])
    tr.ema.load_state_dict(state["ema"])
    _load_algorithm(tr, state)
    tr.cursors = {k: {int(w): int(c) for w, c in v.items()} for k, v in state["cursors"].items()}
    tr.plans = {k: StreamPlan.from_json(state.get("plans", {}).get(k)) for k in tr.plans}
    torch.set_rng_state(state["torch_rng"])
    tr.skipped_total = int(state.get("skipped_total", 0))
    return step


def _load_algorithm(tr, state: dict) -> None:
    tr.da.load_state_dict(state["da"])
    if "algorithm" in state:  # checkpoints before the algorithm seam hold DA alone
        try:
            tr.algorithm.load_state_dict(state["algorithm"])
        except ValueError as e:
            raise ConfigError(f"ssl.algorithm: {e}: resume with the same algorithm") from None


def _resume_elastic(tr, tag: str, old_world: int, old_readers: int) -> int:
    """Resume what ``old_world`` ranks (``old_readers`` loader readers per stream) saved on this
    launch's: weights, optimizer state, EMA, DA and the lr schedule exactly (elastic.pt), and each
    stream's position as a plan that reads the rest of the interrupted epoch once."""
    where = tr.ckpt_dir / tag
    if not (where / elastic.ELASTIC_NAME).exists():
        raise ConfigError(f"{where} was saved by {old_world} ranks x {old_readers // old_world} loader readers "
                          f"without the world-size-independent state ({elastic.ELASTIC_NAME}) that newer "
                          f"checkpoints hold: resume it with the same ranks and train.num_workers")
    state = elastic.load(where / elastic.ELASTIC_NAME)
    elastic.restore(tr.engine, tr.ema, tr.scheduler, state)
    old = [ckpt.load_rank_state(ckpt.rank_state_path(tr.ckpt_dir, tag, r)) for r in range(old_world)]
    tr.step = int(state["step"])
    _load_algorithm(tr, old[0])
    tr.skipped_total = int(old[0].get("skipped_total", 0))
    for which, shards in (("labeled", tr.labeled), ("unlabeled", tr.unlabeled)):
        cursors = {int(w): int(c) for st in old for w, c in st["cursors"].get(which, {}).items()}
        plan = StreamPlan.from_json(old[0].get("plans", {}).get(which))
        try:
            tr.plans[which] = tr._stream(which, shards, 1, None, plan).replan(cursors, old_readers)
        except ValueError as e:
            raise ConfigError(f"data.{which}: {e}") from None
    tr.cursors = {"labeled": {}, "unlabeled": {}}
    tr.engine.global_steps = tr.step
    tr.engine.global_samples = tr.step * tr.cfg.train.batch_size
    # dropout / drop-path masks after this point differ from an uninterrupted run; views do not
    torch.manual_seed(tr.cfg.run.seed * 1_000_003 + tr.step * 131 + tr.rank)
    if tr.rank == 0:
        log.warning("resumed %s on %d ranks x %d loader readers (saved by %d x %d): weights, optimizer state, EMA, "
                    "DA and the lr schedule exactly; the data from where every reader stopped, the rest of the "
                    "interrupted epoch read once", where, tr.world, tr.readers // tr.world, old_world,
                    old_readers // old_world)
    return tr.step
