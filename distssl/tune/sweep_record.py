"""What a sweep is (its tune settings, base config and space) and its record beside its results: the
settings it started with (sweep.yaml), which a rerun must match to resume it, and the Tune experiments
it has grown by (rounds.json)."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from distssl.config import Config, to_dict
from distssl.config.coerce import ConfigError, changed_keys
from distssl.config.tree import _redacted
from distssl.storage import atomic


@dataclass
class TuneSettings:
    num_samples: int = 4
    metric: str = "top1"
    mode: Literal["max", "min"] = "max"
    scheduler: Literal["asha", "fifo"] = "asha"
    grace_period: int = 1  # evals before ASHA may stop a trial
    reduction_factor: int = 2
    workers_per_trial: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    max_concurrent_trials: int = 0  # 0 = as many as resources allow
    max_failures: int = 1  # restarts of a failed trial (from its last checkpoint)
    address: str = ""  # a Ray cluster to join (auto, or HEAD:6379); empty = a Ray of its own on this machine
    # where Ray keeps trial checkpoints and results: any fsspec URL (s3://bucket/sweeps, gs://...) that
    # every node reaches, so a trial restarted on another node resumes from its last checkpoint;
    # empty = run.out_dir/ray on this machine (enough for one node, refused by Ray for several)
    storage_path: str = ""
    num_cpus: int = 0  # local Ray only: CPUs it may use; 0 = all


@dataclass
class Sweep:
    base: Config  # the training config every trial starts from
    tune: TuneSettings
    space: dict[str, dict[str, list]] = field(default_factory=dict)
    out_dir: str = ""
    # the base config with the user's command-line overrides only, without the tune file's own
    # ``overrides:`` (shorter trials, no periodic checkpoints, ...): what best_config.yaml starts from
    user_base: Config | None = None


SETTINGS_NAME = "sweep.yaml"
# may differ when a killed sweep is resumed: where and how wide it runs, not what it searches
# (tune.num_samples may grow: sweep_rounds adds the trials)
RESUMABLE_SWEEP_KEYS = {"tune.address", "tune.num_cpus", "tune.max_concurrent_trials", "tune.max_failures",
                        "tune.num_samples"}


def sweep_settings(sweep: Sweep) -> dict:
    """What defines a sweep's results: the base training config, the tune settings and the space."""

    tree = {"base": _redacted(to_dict(sweep.base)), "tune": dataclasses.asdict(sweep.tune), "space": sweep.space}
    return yaml.safe_load(yaml.safe_dump(tree))  # lists, not tuples: as read back from the file


def check_resumable(sweep: Sweep, sweep_dir: str) -> None:
    """Refuse to resume a sweep folder whose sweep had other settings (they would be replayed, not run)."""
    path = Path(sweep_dir) / SETTINGS_NAME
    if not path.exists():
        return
    changed = [f"{k.removeprefix('base.')}: {a!r} -> {b!r}" for k, a, b in
               changed_keys(yaml.safe_load(path.read_text()) or {}, sweep_settings(sweep), RESUMABLE_SWEEP_KEYS)]
    if changed:
        raise ConfigError(f"run.out_dir={sweep_dir} holds a sweep with other settings ({'; '.join(changed)}): "
                          f"rerunning it would replay that sweep's trials. Use another run.out_dir for new "
                          f"settings, or the same values to resume it")


def _write_settings(sweep: Sweep, sweep_dir: str) -> None:
    path = Path(sweep_dir) / SETTINGS_NAME
    if not path.exists():
        atomic.write_text(path, yaml.safe_dump(sweep_settings(sweep), sort_keys=False))


ROUNDS_NAME = "rounds.json"


def sweep_rounds(sweep_dir: str, num_samples: int) -> list[tuple[str, int]]:
    """The Tune experiments of a sweep, (name, trials): the first is the sweep as it was started
    (sweep.yaml records its num_samples); a rerun with a larger tune.num_samples adds one experiment
    of the missing trials (rounds.json), so a finished sweep grows without any trial running again.
    Fewer trials than the sweep has is refused: its results would silently drop some."""
    settings = Path(sweep_dir) / SETTINGS_NAME
    first = num_samples
    if settings.exists():
        first = int((yaml.safe_load(settings.read_text()) or {}).get("tune", {}).get("num_samples", num_samples))
    path = Path(sweep_dir) / ROUNDS_NAME
    extra = [tuple(r) for r in json.loads(path.read_text())] if path.exists() else []
    rounds = [("sweep", first), *extra]
    have = sum(n for _, n in rounds)
    if num_samples < have:
        raise ConfigError(f"tune.num_samples={num_samples}, but the sweep in {sweep_dir} already has {have} trials: "
                          f"a sweep grows and never shrinks. Give tune.num_samples={have} (or more, to add "
                          f"trials), or another run.out_dir")
    if num_samples > have:
        rounds.append((f"sweep-add{len(rounds)}", num_samples - have))
        atomic.write_text(path, json.dumps([list(r) for r in rounds[1:]]))
    return rounds
