"""Experiment trackers and the best checkpoint: a real run logs its config, every metric line and its
outputs to MLflow (a local file store) and W&B (offline), a resume continues the same tracker run, and
model_best.* holds the EMA weights of the best eval."""
import json

import pytest

from conftest import run_train, tiny_overrides


@pytest.mark.slow
def test_a_run_reports_to_mlflow_and_wandb_and_keeps_its_best_eval(tiny_data, tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    pytest.importorskip("wandb")
    from safetensors.torch import load_file

    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "run"
    args = tiny_overrides(tiny_data, out, **{"train.steps": 4, "train.eval_every": 1, "train.ckpt_every": 2,
                                             "run.loggers": "[tensorboard,mlflow,wandb]",
                                             # a URL with credentials in it (unused here): never logged
                                             "data.demo_root": "s3://AKIDEXAMPLE:s3cr3tKey@bucket/demo"})
    r = run_train(args)
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_train(args + ["train.steps=6"])  # resumed: the same MLflow and W&B runs go on
    assert r.returncode == 0, r.stderr[-3000:]

    evals = [d for d in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if d["kind"] == "eval"]
    assert [d["step"] for d in evals] == [1, 2, 3, 4, 5, 6]
    best = max(evals, key=lambda d: (d["top1"], -d["step"]))  # the first eval that reached the best top-1
    meta = json.loads((out / "model_best.json").read_text())
    assert meta["eval_top1"] == best["top1"] and meta["step"] == best["step"]
    assert evals[-1]["best_top1"] == best["top1"]
    final, kept = load_file(str(out / "model.safetensors")), load_file(str(out / "model_best.safetensors"))
    assert set(final) == set(kept)
    # model_best is calibrated on the eval that chose it: the same fit on its weights' eval logits gives its T
    import torch

    from distssl.calibration import fit_temperature
    from distssl.predict.model import load_predictor
    from distssl.predict.parts import make_parts
    from distssl.predict.rank_parts import labeled_logits

    predictor = load_predictor(str(out / "model_best.safetensors"), torch.device("cpu"))  # fingerprints agree
    assert meta["fingerprint"]["step"] == str(best["step"])
    assert f"at step {best['step']}" in meta["temperature_fitted_on"]
    logits, labels = labeled_logits(predictor, make_parts(tiny_data["eval"]), 64, torch.device("cpu"))
    assert abs(fit_temperature(logits, labels) - meta["temperature"]) < 1e-3 * meta["temperature"]
    assert meta["eval_nll_after"] <= meta["eval_nll_before"] + 1e-9 and "eval_ece_after" in meta
    assert (out / "reliability.png").exists()

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(tmp_path / "mlruns").as_uri())
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1  # one run, continued by the resume
    run = runs[0]
    assert run.data.params["optim.lr"] == "0.03" and run.data.params["model.name"] == "test_resnet"
    assert "s3cr3tKey" not in str(run.data.params) and "bucket/demo" in run.data.params["data.demo_root"]
    top1 = client.get_metric_history(run.info.run_id, "eval/top1")
    assert sorted(m.step for m in top1) == [1, 2, 3, 4, 5, 6]
    assert [m.value for m in sorted(top1, key=lambda m: m.step)] == [d["top1"] for d in evals]
    assert len(client.get_metric_history(run.info.run_id, "train/loss")) == 6
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"model.safetensors", "model_best.safetensors", "curves.png", "config.yaml"} <= artifacts
    assert run.info.status == "FINISHED"

    runs_wb = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert runs_wb and len({p.name for p in runs_wb}) == 1  # one W&B run id across the resume
    logged = b"".join(p.read_bytes() for p in runs_wb)
    assert b"eval/top1" in logged and b"model_best.safetensors" in logged and b"optim" in logged
    assert b"s3cr3tKey" not in logged
    del mlflow


def test_a_tracker_that_fails_mid_run_is_dropped_and_training_goes_on(tmp_path, monkeypatch, capsys):
    """MLflow's store vanishes mid-run: one warning, that tracker gets nothing more, metrics.jsonl
    keeps every line and the run is not stopped."""
    pytest.importorskip("mlflow")
    import shutil

    from distssl.tracking.metrics import MetricsWriter

    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    metrics = MetricsWriter(str(tmp_path), True, 0, 10, ("mlflow",), {"optim": {"lr": 0.03}})
    metrics.log("train", 1, {"loss": 1.0})
    shutil.rmtree(tmp_path / "mlruns")  # the tracking store is gone
    metrics.log("train", 2, {"loss": 0.5})
    metrics.log("train", 3, {"loss": 0.25})
    metrics.close()
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [d["step"] for d in lines] == [1, 2, 3]
    out = capsys.readouterr()
    assert (out.out + out.err).count("MLflow failed") == 1
