"""Reading a finished or interrupted run's checkpoint offline (``distssl-export``, a run folder given as
``model.pretrained``): which checkpoint a path means, every rank's saved objects by name, and the full EMA
weights reassembled from the ranks' shares (any ZeRO stage). The only code outside distssl.checkpoint that
needs a checkpoint's contents goes through here."""
from __future__ import annotations

from pathlib import Path

import torch

from distssl.checkpoint import layout
from distssl.checkpoint.state import by_name
from distssl.distributed.collectives import from_partitions


def find(path: Path) -> tuple[Path, Path]:
    """(run folder, step folder) for a run folder, its checkpoints/ folder, or one step_N folder: the newest
    complete checkpoint."""
    if (path / layout.MARKER).exists():
        return path.parent.parent, path
    ckpt_dir = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    found = layout.latest(ckpt_dir)
    if found is None:
        raise FileNotFoundError(f"{path}: no complete checkpoint (looked for {ckpt_dir}/step_*/{layout.MARKER})")
    run_dir = ckpt_dir.parent if ckpt_dir.name == "checkpoints" else ckpt_dir
    return run_dir, ckpt_dir / found[1]


def rank_states(step_dir: Path) -> list[dict]:
    """Every rank's saved objects (``run``, ``feed``, ``ema``, ``algorithm`` ...) of one checkpoint, in rank
    order; checkpoints of the older flat layout read the same."""
    files = sorted(step_dir.glob("distssl_rank*.pt"))
    if not files:
        raise FileNotFoundError(f"{step_dir}: no distssl_rank*.pt files (not a distssl checkpoint)")
    return [by_name(layout.load_rank_state(f)) for f in files]


def saved_step(states: list[dict]) -> int:
    return int(states[0]["run"]["step"])


def ema_weights(states: list[dict], reference: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The full EMA weights for the names and shapes of ``reference`` (a model's state dict): parameters
    reassembled from every rank's share (whole on each rank below ZeRO-3), buffers from rank 0 (they are
    averaged over ranks before a save). Names the EMA does not hold are left out."""
    shadows, buffers = [s["ema"]["shadow"] for s in states], states[0]["ema"]["buffers"]
    out: dict[str, torch.Tensor] = {}
    for name, ref in reference.items():
        if name in shadows[0]:
            out[name] = from_partitions([s[name] for s in shadows], ref.shape)
        elif name in buffers:
            out[name] = buffers[name].clone()
    return out
