"""One trial, as Ray Train V2 with Tune runs it: a Tune function trainable (the trial's *driver*) starts a
Train ``TorchTrainer`` whose workers are the trial's DeepSpeed ranks, each running :func:`distssl.train.run.run`.

- The driver takes no CPU of its own (``tune.with_resources(..., {"CPU": 0})`` in :mod:`distssl.tune.sweep`):
  it only waits on its Train run, so a 2-CPU machine still runs a 2-worker trial.
- Worker failures are Train's to handle: its ``FailureConfig`` restarts the worker group from the
  latest checkpoint the run reported. Driver failures (its node lost, the sweep killed) are Tune's: a
  restarted driver starts a Train run of the same name in the same storage, and Train V2 restores that
  run's checkpoint list from its snapshot there, so the workers resume from its newest checkpoint.
- Each eval, every rank reports the metrics and its own checkpoint folder (Train merges them into one
  folder in storage: a ZeRO checkpoint is complete there). ``TuneReportCallback`` hands rank 0's metrics
  to the driver, which reports them to Tune (ASHA decides on those).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from distssl.checkpoint import layout as checkpoint
from distssl.config import Config
from distssl.config.coerce import build
from distssl.errors import UserError
from distssl.notices import silence_known_notices
from distssl.train import run as engine
from distssl.tune.space import apply
from distssl.tune.storage import storage_for


def trial_driver(config: dict, base: dict, plan: dict) -> None:
    """The trial's driver, in its Tune actor: one Train V2 run of ``plan['workers']`` ranks training
    ``base`` with the trial's searched values (``config``)."""
    import ray.tune
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    trial_name = ray.tune.get_context().get_trial_name()  # stable across restores: names the run folder
    storage, filesystem = storage_for(plan["storage_url"], plan["sweep_dir"])
    use_gpu = plan["gpus_per_worker"] > 0
    trainer = TorchTrainer(
        worker_loop,
        train_loop_config={"base": base, "values": dict(config), "sweep_dir": plan["sweep_dir"],
                           "trial_name": trial_name, "metric": plan["metric"]},
        scaling_config=ScalingConfig(num_workers=plan["workers"], use_gpu=use_gpu,
                                     resources_per_worker={"CPU": plan["cpus_per_worker"],
                                                           **({"GPU": plan["gpus_per_worker"]} if use_gpu else {})}),
        # a short process-group timeout: a dead rank fails the worker group fast, and Train restarts it
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo", timeout_s=plan["timeout_s"]),
        run_config=RunConfig(name=trial_name, storage_path=f"{storage}/{TRAIN_RUNS}/{plan['round']}",
                             storage_filesystem=filesystem, callbacks=[TuneReportCallback()],
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             failure_config=FailureConfig(max_failures=plan["max_failures"])),
    )
    trainer.fit()  # raises when the workers failed more than max_failures times: the trial is ERROR


TRAIN_RUNS = "train"  # under the storage: <storage>/train/<round>/<trial>, one Train run per trial


def worker_loop(loop_config: dict) -> None:
    """One rank of a trial: the engine with the trial's values, resuming from the run's last checkpoint."""
    import ray.train
    from ray.train import Checkpoint

    base = build(Config, loop_config["base"], "")
    out_dir = os.path.join(loop_config["sweep_dir"], "trials", loop_config["trial_name"])
    restored = ray.train.get_checkpoint()
    if restored is not None and ray.train.get_context().get_local_rank() == 0:
        with restored.as_directory() as d:  # the engine resumes from run.out_dir/checkpoints
            copy_checkpoint_in(Path(d), Path(out_dir) / "checkpoints")

    def report(step: int, metrics: dict, ckpt_dir: Path) -> None:
        ray.train.report({**metrics, "step": step, "out_dir": out_dir},
                         checkpoint=Checkpoint.from_directory(str(ckpt_dir)),
                         checkpoint_dir_name=f"checkpoint_{ckpt_dir.name}")

    silence_known_notices()  # in each rank's process, as launch/train.py does
    try:
        cfg = apply(base, loop_config["values"], out_dir)
        engine.run(cfg, on_eval=report)
    except UserError as e:
        # a mistake in the trial's config is not bad luck: a retry fails the same way. End the trial
        # with the message as its result (results.csv shows it), instead of raising into the retries.
        # Tune wants its metric in every result: NaN, which ASHA's rungs and results.csv both skip
        ray.train.report({"config_error": str(e), "step": 0, loop_config["metric"]: float("nan")})


def copy_checkpoint_in(src: Path, ckpt_root: Path) -> Path:
    """Copy a checkpoint Train restored into the run's checkpoint folder, under a temporary name then
    renamed: the engine must never find a half-copied checkpoint (its COMPLETE marker may come first)."""
    step = int(json.loads((src / checkpoint.MARKER).read_text())["step"])
    dst = ckpt_root / checkpoint.tag_for(step)
    if not dst.exists():
        tmp = ckpt_root / f".{dst.name}.copy-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src, tmp)
        try:
            os.replace(tmp, dst)
        except OSError:  # another node's rank 0 renamed its copy first (a shared file system)
            shutil.rmtree(tmp, ignore_errors=True)
    return dst
