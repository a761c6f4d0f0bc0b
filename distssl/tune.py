"""Ray Tune sweeps over any training key (τ, λ, μ, lr, ...) with ASHA, each trial a real engine run.

Each trial is a Ray Train ``TorchTrainer`` with ``tune.workers_per_trial`` workers running
:func:`distssl.engine.run` (DeepSpeed picks up the process group Ray made). After every eval, every
rank reports the metrics and its checkpoint folder, so a ZeRO checkpoint is complete in Ray's
storage; a restarted trial copies ``ray.train.get_checkpoint()`` back into its run folder and the
engine resumes from it. The TorchTrainer is given to the Tuner so trial resources come from its
ScalingConfig, and the process-group timeout is short so a dead worker fails the trial fast.
"""
from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import yaml

from distssl import atomic, checkpoint
from distssl.config import Config, dump_yaml, load_config, to_dict, validate
from distssl.errors import UserError
from distssl.recipes import resolve_config
from distssl.sweep_record import (  # noqa: F401 - re-exported: what a sweep is and its record
    SETTINGS_NAME,
    Sweep,
    TuneSettings,
    _write_settings,
    check_resumable,
    sweep_rounds,
    sweep_settings,
)
from distssl.typed_tree import ConfigError, build, flatten, parse_override, set_path

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
                    from distssl import preflight
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


# --- inside a trial (each Ray Train worker) ------------------------------------------------------

def train_loop(loop_config: dict) -> None:
    import ray.train
    from ray.train import Checkpoint

    from distssl import engine

    ctx = ray.train.get_context()
    base_tree = loop_config["base"]
    if isinstance(base_tree, ray.ObjectRef):  # see run_sweep: the base config travels by reference
        base_tree = ray.get(base_tree)
    base = build(Config, base_tree, "")
    values = {k: loop_config["space"][k] for k in loop_config["space"]}
    with _known_ray_deprecations():  # the trial name is what names the trial's folder
        trial_name = ctx.get_trial_name()
    out_dir = os.path.join(loop_config["sweep_dir"], "trials", trial_name)
    cfg = apply(base, values, out_dir)
    restored = ray.train.get_checkpoint()
    if restored is not None and ctx.get_local_rank() == 0:
        with restored.as_directory() as d:  # the engine resumes from run.out_dir/checkpoints
            dst = Path(out_dir) / "checkpoints" / _tag_in(d)
            if not dst.exists():
                shutil.copytree(d, dst)

    def report(step: int, metrics: dict, ckpt_dir: Path) -> None:
        ray.train.report({**metrics, "step": step, "out_dir": out_dir},
                         checkpoint=Checkpoint.from_directory(str(ckpt_dir)))

    from distssl.notices import silence_known_notices

    silence_known_notices()  # in the trial's worker process, as launch/train.py does in each rank
    try:
        engine.run(cfg, on_eval=report)
    except UserError as e:
        # a mistake in the trial's config is not bad luck: a retry fails the same way. End the trial
        # with the message as its result (results.csv shows it), instead of raising into Ray's retries.
        ray.train.report({"config_error": str(e), "step": 0})


def _tag_in(d: str) -> str:
    marker = Path(d) / checkpoint.MARKER
    return checkpoint.tag_for(int(json.loads(marker.read_text())["step"]))


# --- the driver ----------------------------------------------------------------------------------

def run_sweep(sweep: Sweep) -> dict:
    # Ray >= 2.48 defaults to Train V2, where a TorchTrainer is no Tune trainable; the sweep hands the
    # TorchTrainer to the Tuner (trial resources from its ScalingConfig), which is the V1 API.
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "0")
    # and Ray's notices about migrating off that API, which a user of this sweep cannot act on
    # (the local Ray's workers inherit it; the driver's own are silenced by _known_ray_deprecations)
    os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
    import ray

    t = sweep.tune
    sweep_dir = str(Path(sweep.out_dir).resolve())
    check_resumable(sweep, sweep_dir)  # a rerun with other settings must not replay the old sweep
    Path(sweep_dir).mkdir(parents=True, exist_ok=True)
    rounds = sweep_rounds(sweep_dir, t.num_samples)
    _write_settings(sweep, sweep_dir)
    if not ray.is_initialized():
        if t.address:
            ray.init(address=t.address)
        else:
            ray.init(num_cpus=t.num_cpus or os.cpu_count(), include_dashboard=False, log_to_driver=True)
    need, have = t.workers_per_trial * t.cpus_per_worker, ray.cluster_resources().get("CPU", 0)
    if need > have:  # the trial would wait in PENDING forever
        raise ConfigError(f"tune.workers_per_trial={t.workers_per_trial} x tune.cpus_per_worker={t.cpus_per_worker} "
                          f"needs {need:g} CPUs but the Ray cluster has {have:g}: lower them, or add nodes "
                          f"(tune.address)")
    dump_yaml(sweep.base, Path(sweep_dir) / "base_config.yaml")
    use_gpu = t.gpus_per_worker > 0
    with _known_ray_deprecations():
        return _fit(sweep, sweep_dir, use_gpu, rounds)


def _fit(sweep: Sweep, sweep_dir: str, use_gpu: bool, rounds: list[tuple[str, int]]) -> dict:
    import ray
    from ray import tune
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    t = sweep.tune
    trainer = TorchTrainer(
        train_loop,
        scaling_config=ScalingConfig(num_workers=t.workers_per_trial, use_gpu=use_gpu,
                                     trainer_resources={"CPU": 0},  # the coordinator only waits on workers
                                     resources_per_worker={"CPU": t.cpus_per_worker,
                                                           **({"GPU": t.gpus_per_worker} if use_gpu else {})}),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo",
                                 timeout_s=int(60 * sweep.base.deepspeed.timeout_minutes)),
    )
    # The base config goes by object reference: Ray prints every trial's whole config when it starts
    # and copies it into each trial's params, so by value the console showed ~60 base keys beside the
    # few searched ones. The reference is given again on restore (the object store is per session).
    param_space = {"train_loop_config": {"base": ray.put(to_dict(sweep.base)), "space": ray_space(sweep.space),
                                         "sweep_dir": sweep_dir}}
    evals = max(1, math.ceil(sweep.base.train.steps / max(1, sweep.base.train.eval_every or sweep.base.train.steps)))
    # max_t one past the last eval: ASHA must not stop a trial at its final report (it would be killed
    # before writing its summary and plot)
    scheduler = (ASHAScheduler(time_attr="training_iteration", max_t=evals + 1, grace_period=min(t.grace_period, evals),
                               reduction_factor=t.reduction_factor)
                 if t.scheduler == "asha" else FIFOScheduler())
    storage, filesystem = _storage(t.storage_path, sweep_dir)
    results = []
    for name, num_samples in rounds:
        path = os.path.join(storage, name)
        if tune.Tuner.can_restore(path, storage_filesystem=filesystem):  # a killed sweep: finished trials kept
            tuner = tune.Tuner.restore(path, trainable=trainer, param_space=param_space, resume_unfinished=True,
                                       resume_errored=True, storage_filesystem=filesystem)
        else:
            tuner = tune.Tuner(
                trainer, param_space=param_space,
                tune_config=tune.TuneConfig(metric=t.metric, mode=t.mode, scheduler=scheduler,
                                            num_samples=num_samples,
                                            max_concurrent_trials=t.max_concurrent_trials or None),
                run_config=RunConfig(name=name, storage_path=storage, storage_filesystem=filesystem, verbose=1,
                                     failure_config=FailureConfig(max_failures=t.max_failures),
                                     checkpoint_config=CheckpointConfig(num_to_keep=2)))
        results.extend(tuner.fit())
    return write_outputs(sweep, results, sweep_dir)


def _storage(url: str, sweep_dir: str):
    """(path, pyarrow filesystem or None) for Ray's storage: a local folder, or any fsspec URL through
    pyarrow's fsspec handler (so S3-compatible endpoints, gs:// and the rest work as for the data)."""
    if not url:
        return str(Path(sweep_dir) / "ray"), None
    if "://" not in url or url.startswith("file://"):
        return os.path.abspath(url.removeprefix("file://")), None
    import pyarrow.fs
    from fsspec.core import url_to_fs

    fs, path = url_to_fs(url)
    return path.rstrip("/"), pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))


@contextlib.contextmanager
def _known_ray_deprecations():
    """Ray's notices about the Train V1 API this sweep uses on purpose (a TorchTrainer given to the Tuner,
    trainer_resources, the trial name), which a user cannot act on: silenced here, and only here."""
    from ray.util.annotations import RayDeprecationWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RayDeprecationWarning)
        yield


def write_outputs(sweep: Sweep, results, sweep_dir: str) -> dict:
    """results.csv (sorted by the metric), best_config.yaml (a complete training config), a plot."""
    metric, mode = sweep.tune.metric, sweep.tune.mode
    rows = []
    for r in results:
        values = r.config["train_loop_config"]["space"]
        hist = r.metrics_dataframe
        series = [] if hist is None or metric not in hist else [v for v in hist[metric].tolist() if v == v]
        best = (max(series) if mode == "max" else min(series)) if series else None
        status, error = trial_status(r, sweep.base.train.steps)
        rows.append({"trial": Path(r.path).name, **values, f"best_{metric}": best,
                     f"last_{metric}": series[-1] if series else None,
                     "steps": (r.metrics or {}).get("step", 0), "status": status, "error": error})
    sign = -1 if mode == "max" else 1
    rows.sort(key=lambda row: (row[f"best_{metric}"] is None, sign * (row[f"best_{metric}"] or 0)))
    keys = list(sweep.space)
    with atomic.atomic_path(Path(sweep_dir) / "results.csv") as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["trial", *keys, f"best_{metric}", f"last_{metric}", "steps", "status",
                                          "error"])
        w.writeheader()
        w.writerows(rows)
    summary = {"trials": len(rows), "results_csv": str(Path(sweep_dir) / "results.csv")}
    failed = [row["trial"] for row in rows if row["status"] == "ERROR"]
    if failed:
        summary["failed_trials"] = failed
    good = [row for row in rows if row[f"best_{metric}"] is not None]
    if good:
        best = good[0]
        # the user's base and the best values; not the tune file's overrides, made for short trials
        cfg = apply(sweep.user_base or sweep.base, {k: best[k] for k in keys}, str(Path(sweep_dir) / "best"))
        dump_yaml(cfg, Path(sweep_dir) / "best_config.yaml")
        summary.update(best={k: best[k] for k in keys}, best_metric=best[f"best_{metric}"],
                       best_config=str(Path(sweep_dir) / "best_config.yaml"))
        _plot(good, keys, metric, Path(sweep_dir) / "sweep.png")
    return summary


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def error_line(error: BaseException) -> str:
    """The exception a trial died of, in one plain line: Ray wraps it in 'ray::_Inner.train() (pid=...)'
    with colour codes and the remote traceback; the last 'SomethingError: message' line is the cause."""
    lines = [_ANSI.sub("", line).strip() for line in str(error).splitlines()]
    causes = [line for line in lines if re.match(r"^[\w.]*(Error|Exception)\b.*:", line)]
    return (causes[-1] if causes else next((line for line in lines if line), type(error).__name__))[:300]


def trial_status(result, steps: int) -> tuple[str, str]:
    """(status, error) of a trial: ERROR when it raised, ended on a config error, or stopped reporting
    at its last step without writing its summary (its process died); STOPPED when ASHA stopped it."""
    metrics = result.metrics or {}
    if result.error:
        return "ERROR", error_line(result.error)
    if metrics.get("config_error"):
        return "ERROR", f"config error: {metrics['config_error']}"[:300]
    if metrics.get("step", 0) < steps:
        return "STOPPED", ""
    trial_dir = metrics.get("out_dir")
    if trial_dir and not (Path(trial_dir) / "summary.json").exists():
        return "ERROR", f"no summary.json in {trial_dir}: the trial ended after its last eval without finishing"
    return "TERMINATED", ""


def _plot(rows: list[dict], keys: list[str], metric: str, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.4), squeeze=False)
    for ax, k in zip(axes[0], keys):
        ax.scatter([r[k] for r in rows], [r[f"best_{metric}"] for r in rows])
        ax.set_xlabel(k)
        ax.set_ylabel(f"best {metric}")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic.atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=90)
    plt.close(fig)
