"""Experiment trackers a run reports to (``run.loggers``), from rank 0 only: TensorBoard events under
out_dir/tb, MLflow (``MLFLOW_TRACKING_URI``; ``pip install "distssl[mlflow]"``) and Weights & Biases
(``WANDB_MODE``, ``WANDB_PROJECT``...; ``pip install "distssl[wandb]"``).

Each gets the resolved config as parameters (credentials in URLs replaced, as in config.yaml), every
metric line (``train/loss``, ``eval/top1``, ...) at its step, and at the end the files a run produces
(curves, summary, the exported and best models). A resumed run continues the same tracker run: its id
is kept in out_dir.
"""
from __future__ import annotations

import logging
import math
import os
import re
import sys
import uuid
from pathlib import Path
from typing import Optional

from distssl.config.coerce import flatten
from distssl.storage.store import redact

log = logging.getLogger("distssl")

LOGGERS = ("tensorboard", "mlflow", "wandb")  # the values run.loggers accepts


def numbers(kind: str, values: dict) -> dict[str, float]:
    """The finite numbers of a metric line, named kind/key."""
    return {f"{kind}/{k}": float(v) for k, v in values.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


class TensorBoard:
    def __init__(self, out: Path, start_step: int, params: dict):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(out / "tb"), purge_step=start_step + 1)
        if start_step == 0:
            self.writer.add_text("config", "\n".join(f"    {k}: {v}" for k, v in flatten(params).items()))

    def metrics(self, step: int, values: dict[str, float]) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)

    def artifacts(self, paths: list[Path]) -> None:
        pass  # the files are beside the events already

    def close(self) -> None:
        self.writer.close()


def _resumable_id(out: Path, name: str) -> Optional[str]:
    try:
        return (out / name).read_text().strip() or None
    except OSError:
        return None


class MLflow:
    ID_FILE = "mlflow_run_id"

    def __init__(self, out: Path, start_step: int, params: dict):
        uri = os.environ.get("MLFLOW_TRACKING_URI", "")
        if uri.startswith("file:") or (uri and "://" not in uri):
            # MLflow 3 refuses its file store unless told: the user chose it by setting this URI
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        import mlflow
        from mlflow.tracking import MlflowClient

        self.mlflow, self.client = mlflow, MlflowClient()
        run_id = _resumable_id(out, self.ID_FILE)
        if run_id is None:
            experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME", "distssl")
            found = self.client.get_experiment_by_name(experiment)
            exp_id = found.experiment_id if found else self.client.create_experiment(experiment)
            run_id = self.client.create_run(exp_id, run_name=out.name, tags={"out_dir": str(out)}).info.run_id
            (out / self.ID_FILE).write_text(run_id)
            items = [mlflow.entities.Param(k, str(v)[:6000]) for k, v in flatten(params).items()]
            for i in range(0, len(items), 100):  # MLflow takes at most 100 parameters per call
                self.client.log_batch(run_id, params=items[i:i + 100])
        else:
            self.client.update_run(run_id, status="RUNNING")
        self.run_id = run_id
        log.info("MLflow: run %s at %s", run_id, mlflow.get_tracking_uri())

    def metrics(self, step: int, values: dict[str, float]) -> None:
        import time

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[self.mlflow.entities.Metric(k, v, now, step)
                                                    for k, v in values.items()])

    def artifacts(self, paths: list[Path]) -> None:
        for p in paths:
            self.client.log_artifact(self.run_id, str(p))

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class WandB:
    ID_FILE = "wandb_run_id"

    def __init__(self, out: Path, start_step: int, params: dict):
        import wandb


        # W&B records the command line with the run: never the credentials a URL on it may hold
        sys.argv[:] = [redact(a) for a in sys.argv]
        run_id = _resumable_id(out, self.ID_FILE) or uuid.uuid4().hex[:8]
        (out / self.ID_FILE).write_text(run_id)
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "distssl"), name=out.name, id=run_id,
                              resume="allow", dir=str(out), config=params)

    def metrics(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def artifacts(self, paths: list[Path]) -> None:
        import wandb

        artifact = wandb.Artifact(re.sub(r"[^A-Za-z0-9._-]", "-", f"{self.run.name}-outputs"), type="model")
        for p in paths:
            artifact.add_file(str(p))
        self.run.log_artifact(artifact)

    def close(self) -> None:
        self.run.finish()


_CLASSES = {"tensorboard": TensorBoard, "mlflow": MLflow, "wandb": WandB}
_EXTRAS = {"mlflow": "mlflow", "wandb": "wandb", "tensorboard": "tensorboard"}


def open_loggers(names: list[str], out: Path, start_step: int, params: dict) -> list:
    """The trackers of ``run.loggers``; a tracker that is not installed is a clear error, not a silent gap."""
    opened = []
    for name in names:
        try:
            opened.append(_CLASSES[name](out, start_step, params))
        except ImportError as e:
            raise ImportError(f"run.loggers has {name}, but {e.name or name} is not installed: pip install "
                              f"\"distssl[{_EXTRAS[name]}]\" (or drop {name} from run.loggers)") from e
    return opened
