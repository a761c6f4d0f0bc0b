"""One typed config tree: YAML file + ``key=value`` overrides, validated before anything starts.

Unknown keys, wrong types and out-of-range values raise :class:`ConfigError` with one line that
names the key and what is allowed; launchers print that line and exit non-zero (no traceback).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from distssl.config.coerce import ConfigError, build, changed_keys, flatten, parse_override, set_path
from distssl.config.recipes import resolve_config
from distssl.config.sections import (  # noqa: F401 - the sections, re-exported with the tree
    ALGORITHM_NAMES,
    PER_TENSOR_OPTIMIZERS,
    DataConfig,
    DeepSpeedConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    SelfTrainConfig,
    SSLConfig,
    TrainConfig,
)
from distssl.data.index import describe_missing
from distssl.data.spec import data_sources
from distssl.errors import MissingCredentials, MissingExtra
from distssl.storage import atomic, store
from distssl.storage.store import redact


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ssl: SSLConfig = field(default_factory=SSLConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    data: DataConfig = field(default_factory=DataConfig)
    selftrain: SelfTrainConfig = field(default_factory=SelfTrainConfig)


# Keys that may change between a run and its resumption without breaking it.
RESUMABLE_CHANGES = {
    "train.steps", "train.eval_every", "train.ckpt_every", "train.keep_checkpoints",
    "train.eval_batch_size", "run.log_every", "train.max_bad_fraction", "data.demo_root",
    "deepspeed.timeout_minutes", "run.out_dir", "run.trace_shards", "run.preempt_signals",
    "run.loggers", "data.cache_dir", "data.cache_limit_gb",
    "train.num_workers",  # a resume with other loader readers continues the data exactly (data/position.py)
} | {f"selftrain.{f.name}" for f in dataclasses.fields(SelfTrainConfig)}  # distssl-selftrain's, not a run's


# Keys that moved to the section of the part that reads them. A config that names the old key is told the
# new one; a saved run's config.yaml is compared with them renamed (a resume across the move is no change).
MOVED_KEYS = {"ssl.ema_decay": "train.ema_decay", "ssl.ema_warmup": "train.ema_warmup",
              "ssl.weak_forward": "train.weak_forward"}


def _moved(key: str, fix: str) -> ConfigError:
    """The one line for a moved key: its new name, and ``fix`` (what to do where it was given)."""
    return ConfigError(f"{key} is now {MOVED_KEYS[key]} (same meaning: the training loop reads it): {fix}")


def migrate_moved(tree: dict) -> dict:
    """A copy of a saved config tree with the moved keys under their new names."""
    flat = flatten(tree)
    out: dict = {}
    for key, value in flat.items():
        set_path(out, MOVED_KEYS.get(key, key), value)
    return out


def load_config(path: Optional[str] = None, overrides: tuple[str, ...] | list[str] = (), *,
                require_data: bool = True) -> Config:
    """YAML file (optional) + overrides -> validated :class:`Config`; ``require_data`` False lets the data keys
    be unset (a recipe printed before it is filled in: ``--print-config``)."""
    tree: dict = {}
    if path:
        path = resolve_config(path)  # a file, or a recipe shipped in the package by name (demo, cifar10, ...)
        try:
            with open(path) as f:
                tree = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"--config {path}: not valid YAML ({str(e).splitlines()[0]})") from None
    for key in MOVED_KEYS.keys() & flatten(tree).keys():
        raise _moved(key, f"rename it in --config {path}")
    for text in overrides:
        key, value = parse_override(text)
        if key in MOVED_KEYS:
            raise _moved(key, f"give {MOVED_KEYS[key]}={text.split('=', 1)[1]}")
        set_path(tree, key, value)
    cfg = build(Config, tree, "")
    validate(cfg, require_data)
    return cfg


REQUIRED_DATA = ("labeled", "unlabeled", "eval")


def unset_data_keys(cfg: Config) -> list[str]:
    return [f"data.{key}" for key in REQUIRED_DATA if not getattr(cfg.data, key)]


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is out of range: allowed {allowed}")


def validate(cfg: Config, require_data: bool = True) -> None:
    """Range checks that types alone do not catch: each section checks its own fields (its ``validate``),
    then what spans sections. Paths are checked by :func:`check_paths`."""
    for section in dataclasses.fields(cfg):
        getattr(cfg, section.name).validate(lambda ok, key, value, allowed, prefix=section.name:
                                            _check(ok, f"{prefix}.{key}", value, allowed))
    o, d = cfg.optim, cfg.data
    per_tensor = [k for k in PER_TENSOR_OPTIMIZERS if k in o.name.lower()]
    if per_tensor and cfg.deepspeed.zero_stage > 0:
        raise ConfigError(f"optim.name={o.name} computes per-tensor statistics ({per_tensor[0]}: layer-wise trust "
                          f"ratios, factored or matrix state), but deepspeed.zero_stage={cfg.deepspeed.zero_stage} "
                          "steps the optimizer on flat partitions that mix tensors (measured: tests/"
                          "test_optimizers.py). Use deepspeed.zero_stage=0, or an element-wise optimizer "
                          "(sgd, adamw, lion, ...)")
    if d.labeled_targets == "soft" and (cfg.ssl.lambda_u > 0 or d.decode_on == "device"):
        raise ConfigError("data.labeled_targets=soft is read by the supervised step: it needs ssl.lambda_u=0 and "
                          "data.decode_on=loader (or keep data.labeled_targets=hard)")
    for key in unset_data_keys(cfg) if require_data else ():
        raise ConfigError(f"{key} is not set: give a shard-set folder/URL with index.json "
                          f"or a brace pattern such as shards/train-{{000000..000009}}.tar")


def check_paths(cfg: Config) -> None:
    """Data paths exist (local ones; remote URLs are checked when opened) and out_dir is writable."""

    for key in ("labeled", "unlabeled", "eval"):
        sources = data_sources(getattr(cfg.data, key))
        for i, (path, _) in enumerate(sources):
            where = f"data.{key}{f'[{i}]' if len(sources) > 1 else ''}"
            if "://" in path and not path.startswith("file://"):
                try:  # its filesystem installed, and credentials for it: said now, in one line
                    store.check_access(path.split("{", 1)[0])
                except (MissingExtra, MissingCredentials) as e:
                    raise type(e)(f"{where}={e}") from None
            problem = describe_missing(path, key)
            if problem:
                raise ConfigError(f"{where}: {problem}")
    if cfg.model.pretrained and "://" not in cfg.model.pretrained and not os.path.exists(cfg.model.pretrained):
        raise ConfigError(f"model.pretrained: {cfg.model.pretrained} does not exist (give a local file or URL)")
    out = Path(cfg.run.out_dir)
    probe = out if out.exists() else next((p for p in out.parents if p.exists()), Path("."))
    if not os.access(probe, os.W_OK):
        raise ConfigError(f"run.out_dir: {cfg.run.out_dir} is not writable ({probe} denies writing)")


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def redacted_dict(cfg: Config) -> dict:
    """The config as a tree for files and trackers: credentials in URLs replaced."""
    return _redacted(to_dict(cfg))


def dump_yaml(cfg: Config, path: str | Path) -> None:
    """Write the resolved config atomically (tmp + rename)."""
    atomic.write_text(path, yaml.safe_dump(redacted_dict(cfg), sort_keys=False))


def _redacted(tree: Any) -> Any:
    """Credentials embedded in URLs never reach files on disk."""

    if isinstance(tree, dict):
        return {k: _redacted(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_redacted(v) for v in tree]
    return redact(tree) if isinstance(tree, str) else tree


def resume_conflicts(saved: dict, cfg: Config) -> list[str]:
    """Keys whose values differ from the saved run in a way that breaks resuming it. A key the saved config
    lacks (the run predates it) at its default value is no change: that run behaved as the default."""
    saved = migrate_moved(saved)
    had, defaults = flatten(saved), flatten(redacted_dict(Config()))
    return [f"{k}: {a!r} -> {b!r}" for k, a, b in changed_keys(saved, redacted_dict(cfg), RESUMABLE_CHANGES)
            if k in had or b != defaults.get(k)]
