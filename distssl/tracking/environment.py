"""The environment a run ran in: package versions, torch's CUDA/cuDNN/NCCL, the device, the commit.

Two machines running the same commit and recipe can train to different places when a dependency moved
(unpinned packages: numpy, Pillow's resampling, timm's layers) or the device differs; nothing recorded which.
Every run writes ``env.json`` beside its ``config.yaml`` at its first launch, and a resume in another
environment says, in one line, what differs (the run goes on: a resume across a driver update is legitimate,
but its numbers are no longer one environment's).
"""
from __future__ import annotations

import importlib.metadata
import json
import logging
import platform
import sys
from pathlib import Path
from typing import Optional

from distssl.storage import atomic

log = logging.getLogger(__name__)
ENV_NAME = "env.json"
PACKAGES = ("distssl", "torch", "torchvision", "deepspeed", "timm", "webdataset", "numpy", "pillow", "simplejpeg",
            "fsspec", "pyarrow", "safetensors", "torchcodec", "ray", "s3fs", "gcsfs", "adlfs")


def _version(name: str) -> Optional[str]:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _commit() -> Optional[str]:
    """The checkout's commit when distssl runs from one (read from .git, no subprocess), else None."""
    git = Path(__file__).resolve().parents[2] / ".git"
    try:
        if git.is_file():  # a worktree: "gitdir: PATH"
            git = Path(git.read_text().split(":", 1)[1].strip())
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref: "):
            return head
        ref = head[5:]
        if (git / ref).exists():
            return (git / ref).read_text().strip()
        common = Path((git / "commondir").read_text().strip()) if (git / "commondir").exists() else None
        root = (git / common) if common is not None else git
        if (root / ref).exists():
            return (root / ref).read_text().strip()
        for line in (root / "packed-refs").read_text().splitlines():
            if line.endswith(" " + ref):
                return line.split()[0]
    except (OSError, IndexError):
        pass
    return None


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def collect() -> dict:
    """This process's environment (what can move a run's numbers)."""
    import torch

    cuda = torch.cuda.is_available()
    nccl = None
    if cuda:
        try:
            nccl = ".".join(map(str, torch.cuda.nccl.version()))
        except Exception:  # noqa: BLE001 - a build without NCCL
            nccl = None
    return {
        "python": sys.version.split()[0], "platform": platform.platform(), "machine": platform.machine(),
        "packages": {name: v for name in PACKAGES if (v := _version(name)) is not None},
        "torch": {"cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if cuda else None,
                  "nccl": nccl, "threads": torch.get_num_threads()},
        "device": torch.cuda.get_device_name(0) if cuda else f"cpu: {_cpu()}",
        "commit": _commit(),
    }


def differences(saved: dict, now: dict) -> list[str]:
    """What differs between two environments, as 'name: old -> new' (package versions, torch's libraries,
    the device, the commit, Python)."""
    out = []
    names = sorted(set(saved.get("packages", {})) | set(now.get("packages", {})))
    for name in names:
        a, b = saved.get("packages", {}).get(name), now.get("packages", {}).get(name)
        if a != b:
            out.append(f"{name} {a or 'absent'} -> {b or 'absent'}")
    for key in ("cuda", "cudnn", "nccl"):
        a, b = saved.get("torch", {}).get(key), now.get("torch", {}).get(key)
        if a != b:
            out.append(f"{key} {a} -> {b}")
    for key in ("device", "commit", "python"):
        if saved.get(key) != now.get(key):
            out.append(f"{key} {saved.get(key)} -> {now.get(key)}")
    return out


def record(out_dir: str | Path) -> list[str]:
    """Write ``env.json`` at a run's first launch; at a later one, what differs from it (logged in one line)."""
    path = Path(out_dir) / ENV_NAME
    now = collect()
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        atomic.write_text(path, json.dumps(now, indent=1))
        return []
    changed = differences(saved, now)
    if changed:
        log.warning("this launch runs in another environment than %s records: %s (its numbers mix two "
                    "environments)", path, "; ".join(changed))
    return changed
