"""Complete-or-invisible checkpoints around DeepSpeed's own.

Every rank writes into ``tmp_step_N`` (DeepSpeed's files plus our per-rank state: EMA, distribution
alignment, RNG, data cursors); after a barrier rank 0 renames the folder to ``step_N`` and writes
``COMPLETE`` last. Resuming picks the newest folder that has ``COMPLETE``; a folder cut short by a
kill is never loaded (it is reported and removed on the next save).
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Optional

import torch

from distssl.storage import atomic

log = logging.getLogger(__name__)
TAG_RE = re.compile(r"^step_(\d{8})$")
MARKER = "COMPLETE"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def complete_tags(ckpt_dir: Path) -> list[tuple[int, str]]:
    if not ckpt_dir.is_dir():
        return []
    out = []
    for d in ckpt_dir.iterdir():
        m = TAG_RE.match(d.name)
        if m and (d / MARKER).is_file():
            out.append((int(m.group(1)), d.name))
    return sorted(out)


def incomplete_dirs(ckpt_dir: Path) -> list[Path]:
    if not ckpt_dir.is_dir():
        return []
    return sorted(d for d in ckpt_dir.iterdir()
                  if d.is_dir() and (d.name.startswith("tmp_") or (TAG_RE.match(d.name) and not (d / MARKER).exists())))


def latest(ckpt_dir: Path) -> Optional[tuple[int, str, dict]]:
    """(step, tag, marker info) of the newest complete checkpoint, warning about incomplete ones."""
    for d in incomplete_dirs(ckpt_dir):
        log.warning("ignoring incomplete checkpoint %s (cut short while being written)", d)
    tags = complete_tags(ckpt_dir)
    if not tags:
        return None
    step, tag = tags[-1]
    info = json.loads((ckpt_dir / tag / MARKER).read_text() or "{}")
    return step, tag, info


def rank_state_path(ckpt_dir: Path, tag: str, rank: int) -> Path:
    return ckpt_dir / tag / f"distssl_rank{rank:05d}.pt"


def save_rank_state(path: Path, state: dict) -> None:
    with atomic.atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_rank_state(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing from the checkpoint (was it saved with another world size?)")
    return torch.load(path, map_location="cpu", weights_only=True)


def finalize(ckpt_dir: Path, tmp_tag: str, step: int, info: dict, keep: int) -> None:
    """Rank 0, after every rank has written: rename, mark complete, prune old and cut-short ones."""
    final = ckpt_dir / tag_for(step)
    if final.exists():
        shutil.rmtree(final)
    os.replace(ckpt_dir / tmp_tag, final)
    atomic.write_text(final / MARKER, json.dumps({"step": step, **info}))
    for d in incomplete_dirs(ckpt_dir):
        shutil.rmtree(d, ignore_errors=True)
    for _, tag in complete_tags(ckpt_dir)[:-keep]:
        shutil.rmtree(ckpt_dir / tag, ignore_errors=True)


def deepspeed_safe_globals() -> list:
    """The DeepSpeed classes its checkpoints hold, allow-listed for ``weights_only=True`` loading."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def safe_load(path, map_location=None):
    with torch.serialization.safe_globals(deepspeed_safe_globals()):
        return torch.load(path, map_location=map_location, weights_only=True)


def use_safe_loading(engine) -> None:
    """DeepSpeed's checkpoint engine loads with ``weights_only=False`` (arbitrary unpickling); route its
    loads through :func:`safe_load` so a planted pickle payload in a checkpoint cannot execute."""
    engine.checkpoint_engine.load = safe_load
