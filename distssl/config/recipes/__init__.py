"""The recipes that ship inside the package: training configs (``demo``, ``starter``, ``cifar10``,
``imagenet``, ``vit_finetune``), sweep configs (``tune/demo``) and the DeepSpeed templates
(``deepspeed/zero{0..3}.json``, ``zero2_bf16.json``).

A wheel installed on a cluster image has no checkout beside it, so ``--config demo`` and the default
templates are found here, from any folder. In a checkout, top-level ``configs/`` is this folder.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from distssl.errors import ConfigError

RECIPES = Path(__file__).resolve().parent
TEMPLATES = RECIPES / "deepspeed"


def names(kind: str = "train") -> list[str]:
    """The shipped recipes of one kind, by the name ``--config`` takes."""
    folder = RECIPES / "tune" if kind == "tune" else RECIPES
    return sorted(p.stem for p in folder.glob("*.yaml"))


def resolve_config(given: str, kind: str = "train") -> str:
    """``--config``'s value as a file: a path that exists; else a shipped recipe by name (``demo``) or as
    the checkout spells it (``configs/demo.yaml``, ``configs/tune/demo.yaml``)."""
    if os.path.isfile(given):
        return given
    shipped = _shipped(given, kind)
    if shipped is not None:
        return str(shipped)
    raise ConfigError(f"--config {given}: no such file, and no shipped {kind} recipe of that name "
                      f"(shipped: {', '.join(names(kind))}); give a YAML path or one of those names")


def _shipped(given: str, kind: str) -> Optional[Path]:
    rel = given.removeprefix("./").removeprefix("configs/")
    candidates = [RECIPES / rel]
    if not rel.endswith((".yaml", ".yml")):
        candidates.insert(0, RECIPES / ("tune" if kind == "tune" else "") / f"{rel}.yaml")
    return next((c for c in candidates if c.is_file()), None)


def template_path(template: Optional[str], zero_stage: int) -> Path:
    """The DeepSpeed JSON template: ``deepspeed.template`` as a path that exists, else a shipped one by
    name or as the checkout spells it (``configs/deepspeed/zero2_bf16.json``); unset, ``zero{stage}.json``."""
    if not template:
        return TEMPLATES / f"zero{zero_stage}.json"
    if os.path.isfile(template) or os.path.isabs(template):
        return Path(template)
    rel = template.removeprefix("./").removeprefix("configs/").removeprefix("deepspeed/")
    for candidate in (TEMPLATES / rel, TEMPLATES / f"{rel}.json"):
        if candidate.is_file():
            return candidate
    return Path(template)  # named in the error that follows, as given
