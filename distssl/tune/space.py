"""What a sweep searches: the tune YAML and its overrides read into a :class:`Sweep`, the space checked
before any trial starts, a trial's values applied to the base config, and the space in Ray's terms."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import yaml

from distssl.config import Config, load_config, to_dict, validate
from distssl.config.coerce import ConfigError, build, flatten, parse_override, set_path
from distssl.config.recipes import resolve_config
from distssl.train import preflight
from distssl.tune.sweep_record import Sweep, TuneSettings

DISTRIBUTIONS = ("choice", "grid", "uniform", "loguniform", "randint")


def load_sweep(path: str, overrides: list[str] = ()) -> Sweep:
    """Tune YAML (``base``, ``tune``, ``space``, ``overrides``) + CLI overrides -> validated :class:`Sweep`.
    CLI ``tune.*`` keys set the sweep; every other key overrides the base training config."""
    path = resolve_config(path, kind="tune")  # a file, or a shipped sweep by name (demo)
    tree = yaml.safe_load(Path(path).read_text()) or {}
    unknown = set(tree) - {"base", "tune", "space", "overrides"}
    if unknown:
        raise ConfigError(f"unknown key '{sorted(unknown)[0]}' in {path}: "
                          "a tune config has base, tune, space, overrides")
    if "base" not in tree:
        raise ConfigError(f"{path}: 'base' (the training config the trials start from) is missing")
    base_path = str((Path(path).parent / tree["base"]).resolve())
    tune_tree = dict(tree.get("tune") or {})
    sweep_overrides = [f"{k}={json.dumps(v)}" for k, v in flatten(tree.get("overrides") or {}).items()]
    user_overrides = []
    for text in overrides:
        key, value = parse_override(text)
        if key.startswith("tune."):
            set_path(tune_tree, key[len("tune."):], value)
        else:
            user_overrides.append(text)
    settings = build(TuneSettings, tune_tree, "tune")
    for key in ("num_samples", "grace_period", "reduction_factor", "workers_per_trial"):
        if getattr(settings, key) < 1:
            raise ConfigError(f"tune.{key}={getattr(settings, key)} is out of range: allowed >= 1")
    base = load_config(base_path, sweep_overrides + user_overrides)
    _absolute_paths(base)  # trials run in their own working folders
    user_base = load_config(base_path, user_overrides)
    _absolute_paths(user_base)
    space = tree.get("space") or {}
    check_space(space, base)
    return Sweep(base=base, tune=settings, space=space, out_dir=base.run.out_dir, user_base=user_base)


def _absolute_paths(cfg: Config) -> None:
    for section, key in (("data", "labeled"), ("data", "unlabeled"), ("data", "eval"), ("data", "demo_root"),
                         ("model", "pretrained"), ("run", "out_dir"), ("deepspeed", "template")):
        obj = getattr(cfg, section)
        value = getattr(obj, key)
        if isinstance(value, list):  # several shard sets (config.DataSpec)
            for item in value:
                if "://" not in item["path"] and not os.path.isabs(item["path"]):
                    item["path"] = os.path.abspath(item["path"])
        elif value and "://" not in value and not os.path.isabs(value):
            setattr(obj, key, os.path.abspath(value))


def check_space(space: dict, base: Config) -> None:
    """Every searched key must be a training key, and every value it can take must validate."""
    if not space:
        raise ConfigError("space: empty; give at least one key, e.g. ssl.tau: {choice: [0.9, 0.95]}")
    for key, spec in space.items():
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
            raise ConfigError(f"space.{key}: give one of {', '.join(DISTRIBUTIONS)}, e.g. {{choice: [0.9, 0.95]}}")
        kind, args = next(iter(spec.items()))
        if kind in ("choice", "grid"):
            if not isinstance(args, list) or not args:
                raise ConfigError(f"space.{key}.{kind}: expected a non-empty list of values")
            samples = args
        else:
            if not isinstance(args, list) or len(args) != 2:
                raise ConfigError(f"space.{key}.{kind}: expected [low, high]")
            lo, hi = args
            if kind == "loguniform" and lo <= 0:
                raise ConfigError(f"space.{key}.loguniform: low must be > 0")
            samples = [lo, hi - 1] if kind == "randint" else [lo, hi]
        for v in samples:
            try:
                cfg = apply(base, {key: v}, base.run.out_dir)
                if key.startswith(("model.", "data.")):  # a wrong model or data set fails here, not in a trial
                    preflight.check(cfg)
            except ConfigError as e:
                raise ConfigError(f"space.{key}: {e}") from None


def apply(base: Config, values: dict[str, Any], out_dir: str) -> Config:
    tree = to_dict(base)
    for k, v in values.items():
        set_path(tree, k, v)
    tree["run"]["out_dir"] = out_dir
    cfg = build(Config, tree, "")
    validate(cfg)
    return cfg


def ray_space(space: dict) -> dict:
    from ray import tune

    make = {"choice": lambda a: tune.choice(a), "grid": lambda a: tune.grid_search(a),
            "uniform": lambda a: tune.uniform(*a), "loguniform": lambda a: tune.loguniform(*a),
            "randint": lambda a: tune.randint(*a)}
    return {k: make[kind](args) for k, spec in space.items() for kind, args in spec.items()}


