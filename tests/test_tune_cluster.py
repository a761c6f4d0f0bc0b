"""A sweep on a two-node Ray cluster with its storage in S3 (moto): a trial whose node is lost, with
its local disk, restarts on the other node from the last checkpoint it reported."""
import csv
import json
import os
import shutil
import subprocess
import sys
import time

import psutil
import pytest

from conftest import ROOT, s3fs_fresh, tiny_overrides


@pytest.fixture
def cluster(s3_server):
    """A head that runs no trials (0 CPUs) and two nodes of 1 CPU: a trial lives on one of them."""
    import boto3
    from ray.cluster_utils import Cluster

    boto3.client("s3").create_bucket(Bucket="tune-storage")
    # Train's controller learns of a worker's reports when it polls the workers (every 2 s by default);
    # a tiny trial reports faster than that. The raylets, and so the controller, inherit this.
    os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = "0.25"
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    nodes = [c.add_node(num_cpus=1) for _ in range(2)]
    c.wait_for_nodes()
    yield c, nodes
    c.shutdown()
    del os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"]


def _node_of_train_worker(nodes):
    """The cluster node whose raylet runs the trial's Ray Train worker (None until it exists)."""
    raylets = {n.all_processes["raylet"][0].process.pid: n for n in nodes if "raylet" in n.all_processes}
    for p in psutil.process_iter(["cmdline"]):
        if "RayTrainWorker" in " ".join(p.info["cmdline"] or []):
            for parent in p.parents():
                if parent.pid in raylets:
                    return raylets[parent.pid]
    return None


def _reported_checkpoints(fs) -> set[str]:
    """Checkpoint folders in the storage (the newest may still be uploading, and a trial that dies then
    restarts from the one before it)."""
    if not fs.exists("tune-storage/sweeps"):
        return set()
    return {p.split("/checkpoint_")[1].split("/")[0] for p in fs.find("tune-storage/sweeps") if "/checkpoint_" in p}


@pytest.mark.slow
@pytest.mark.s3
@pytest.mark.ray
def test_a_trial_on_a_lost_node_resumes_on_the_other_from_s3(tiny_data, tmp_path, cluster):
    c, nodes = cluster
    sweep = tmp_path / "sweep"
    args = tiny_overrides(tiny_data, sweep, **{"train.steps": 120, "train.eval_every": 15, "train.ckpt_every": 0})
    cmd = [sys.executable, str(ROOT / "launch/tune.py"), "--config", str(ROOT / "configs/tune/demo.yaml"), *args,
           "tune.num_samples=1", f"tune.address={c.address}", "tune.storage_path=s3://tune-storage/sweeps",
           "tune.scheduler=fifo", "tune.max_failures=2"]
    log = tmp_path / "tune.log"
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=ROOT,
                            env={**os.environ, "DS_ACCELERATOR": "cpu", "RAY_DEDUP_LOGS": "0"})
    fs, lost, deadline = s3fs_fresh(), None, time.time() + 400
    while time.time() < deadline and proc.poll() is None:
        fs.invalidate_cache()
        if len(_reported_checkpoints(fs)) >= 2:
            time.sleep(1.0)  # past a few of the controller's polls: the first checkpoint is registered
            lost = _node_of_train_worker(nodes)
            if lost is not None:
                c.remove_node(lost)  # the node goes, and with it its disk: the trial's local run folder
                shutil.rmtree(sweep / "trials", ignore_errors=True)
                break
        time.sleep(0.5)
    assert lost is not None, log.read_text()[-3000:]
    assert proc.wait(timeout=400) == 0, log.read_text()[-4000:]
    with open(sweep / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1 and int(rows[0]["steps"]) == 120, rows
    trial = next((sweep / "trials").iterdir())
    steps = [d["step"] for d in map(json.loads, (trial / "metrics.jsonl").read_text().splitlines()) if "loss" in d]
    assert min(steps) > 1 and max(steps) == 120  # it went on from a checkpoint fetched from S3, not from step 1
    assert "resumed from" in (trial / "metrics.jsonl").read_text() or "resumed" in log.read_text()
