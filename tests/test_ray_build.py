"""make_shards --ray-address: the shard jobs as tasks on a real two-node Ray cluster, into S3 (moto)."""
import json
import threading
import time

import pytest

from conftest import export_digits, s3fs_fresh
from support.servers import upload_folder


@pytest.fixture(scope="module")
def raw_bucket(s3_server, tmp_path_factory):
    import boto3

    local = tmp_path_factory.mktemp("raw")
    export_digits(local, n_train=400, n_eval=0, seed=2)
    (local / "train/4/bad_empty.png").write_bytes(b"")
    upload_folder(local, "s3://ray-raw")
    boto3.client("s3").create_bucket(Bucket="ray-shards")
    return local


@pytest.fixture
def cluster(raw_bucket):
    """Two Ray nodes on this machine, each with its own CPU and raylet (the env reaches both)."""
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    worker = c.add_node(num_cpus=1)
    c.wait_for_nodes()
    yield c, worker
    c.shutdown()


def _set(fs, prefix):
    return json.loads(fs.cat_file(f"{prefix}/index.json"))


@pytest.mark.slow
@pytest.mark.s3
@pytest.mark.ray
def test_ray_cluster_build_into_s3_survives_a_lost_node_and_a_rerun_writes_nothing(cluster):
    from distssl.shards import make_shards

    c, worker = cluster
    lost = {}

    def lose_the_worker_node():  # once shards are being written, the second node goes away
        fs = s3fs_fresh()
        deadline = time.time() + 120
        while time.time() < deadline:
            done = [p for p in fs.ls("ray-shards/set/unlabeled", refresh=True) if p.endswith(".stats.json")] \
                if fs.exists("ray-shards/set/unlabeled") else []
            if len(done) >= 3:
                c.remove_node(worker)
                lost["after"] = len(done)
                return
            time.sleep(0.05)

    killer = threading.Thread(target=lose_the_worker_node)
    killer.start()
    sets = make_shards("s3://ray-raw/train", "s3://ray-shards/set", labels_per_class=2, max_count=10,
                       ray_address=c.address, progress=False)
    killer.join()
    assert lost.get("after"), "the worker node was not removed mid-build"
    fs = s3fs_fresh()
    unl, lab = _set(fs, "ray-shards/set/unlabeled"), _set(fs, "ray-shards/set/labeled")
    assert unl["count"] == 400 and lab["count"] == 20 and sets["unlabeled"]["count"] == 400
    assert unl["failure_reasons"] == {"empty file": 1}
    assert sum(s["count"] for s in unl["shards"]) == 400 and all(s["count"] <= 10 for s in unl["shards"])
    assert [s["name"] for s in unl["shards"]] == [f"shard-{i:06d}.tar" for i in range(len(unl["shards"]))]

    before = {p: fs.info(p)["ETag"] for p in fs.find("ray-shards/set")}
    make_shards("s3://ray-raw/train", "s3://ray-shards/set", labels_per_class=2, max_count=10,
                ray_address=c.address, progress=False)
    after = {p: s3fs_fresh().info(p)["ETag"] for p in fs.find("ray-shards/set")}
    assert after == before  # complete shards are never rewritten


@pytest.mark.slow
def test_local_destination_on_a_cluster_of_several_machines_is_refused(tmp_path, monkeypatch):
    from distssl.shards.runners import RayRunner

    class FakeRay:  # a cluster spanning two hosts cannot be made on one machine: its node table is
        @staticmethod
        def nodes():
            return [{"Alive": True, "NodeManagerAddress": "10.0.0.1"},
                    {"Alive": True, "NodeManagerAddress": "10.0.0.2"}]

        @staticmethod
        def init(**kw):
            pass

    import sys
    monkeypatch.setitem(sys.modules, "ray", FakeRay)
    with pytest.raises(ValueError, match="spans 2 machines"):
        RayRunner("auto", str(tmp_path / "shards"))
