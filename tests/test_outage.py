"""The object store goes away and comes back: streaming continues where it was, a build resumes.
A TCP proxy in front of the real S3-protocol server (moto) cuts every connection and refuses new ones."""
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from conftest import ROOT, s3fs_fresh, stream_batches
from support.servers import TcpProxy, upload_folder


@pytest.fixture()
def proxy(s3_server, monkeypatch):
    import s3fs

    p = TcpProxy(int(s3_server.rsplit(":", 1)[1]))
    monkeypatch.setenv("AWS_ENDPOINT_URL", p.url)
    s3fs.S3FileSystem.clear_instance_cache()
    yield p
    p.down()
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.mark.slow
@pytest.mark.s3
def test_streaming_survives_an_outage_and_yields_the_same_batches(tiny_data, s3_server, proxy, caplog):
    upload_folder(tiny_data["unlabeled"], "s3://outage/unlabeled")
    t0 = time.time()
    # 1,200 samples: every one of the 12 shards opened, then a second epoch
    reference = stream_batches("s3://outage/unlabeled", 60)
    undisturbed = time.time() - t0

    def outage():  # 6 s of refused connections: longer than s3fs's own retries, so ours must act
        proxy.down()
        threading.Timer(6.0, proxy.up).start()

    t0 = time.time()
    with caplog.at_level(logging.WARNING):
        interrupted = stream_batches("s3://outage/unlabeled", 60, outage=outage)
    took = time.time() - t0
    assert interrupted == reference  # nothing lost, nothing repeated, same order and augmentations
    # the outage was met and waited out (by s3fs's retries or ours: "retrying" in the log), not skipped
    assert took >= undisturbed + 2.0


@pytest.mark.slow
@pytest.mark.s3
def test_a_build_that_loses_the_store_fails_cleanly_and_the_rerun_completes(tiny_data, s3_server, proxy, tmp_path):
    from pathlib import Path

    raw = Path(tiny_data["raw"]) / "train"
    upload_folder(raw, "s3://outage-raw/train")
    import boto3
    boto3.client("s3").create_bucket(Bucket="outage-shards")
    cmd = [sys.executable, str(ROOT / "tools/make_shards.py"), "s3://outage-raw/train", "s3://outage-shards/set",
           "--unlabeled", "--max-count", "25", "--workers", "1", "--quiet"]
    # give up sooner: our retries and botocore's own (each of s3fs's calls would otherwise retry 5 times)
    env = {**os.environ, "AWS_ENDPOINT_URL": proxy.url, "DISTSSL_IO_ATTEMPTS": "3", "AWS_MAX_ATTEMPTS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    fs = s3fs_fresh()
    deadline = time.time() + 120
    while time.time() < deadline:  # wait until some shards are done, then take the store away for good
        fs.invalidate_cache()
        if len([p for p in fs.find("outage-shards/set") if p.endswith(".stats.json")]) >= 2:
            break
        time.sleep(0.05)
    proxy.down()
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 1, err[-2000:]
    assert "Rerun the same command" in err and "Traceback" not in err
    proxy.up()
    fs.invalidate_cache()
    assert not fs.exists("outage-shards/set/index.json")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    fs.invalidate_cache()
    idx = json.loads(fs.cat("outage-shards/set/index.json"))
    assert idx["num_failures"] == 0  # an outage is not a broken image
    paths = []
    import tarfile
    for p in sorted(fs.find("outage-shards/set")):
        if p.endswith(".tar"):
            with fs.open(p, "rb") as f, tarfile.open(fileobj=f, mode="r|") as t:
                paths += [json.loads(t.extractfile(m).read())["path"] for m in t if m.name.endswith(".json")]
    assert idx["count"] == len(paths) == 600  # every image exactly once: none lost, none twice
    assert sorted(paths) == sorted(str(p.relative_to(raw)) for p in raw.rglob("*.png"))


@pytest.mark.slow
@pytest.mark.s3
def test_a_build_that_cannot_reach_the_store_at_all_says_to_rerun(tmp_path):
    """The first thing a build does is look for its record (build.json): a store that is down then
    (a botocore error, not an OSError) must give the same clean message, not a traceback."""
    from PIL import Image

    (tmp_path / "raw/a").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "raw/a/1.png")
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "x",
           "AWS_SECRET_ACCESS_KEY": "x", "DISTSSL_IO_ATTEMPTS": "1", "AWS_MAX_ATTEMPTS": "1"}
    r = subprocess.run([sys.executable, str(ROOT / "tools/make_shards.py"), str(tmp_path / "raw"), "s3://nowhere/set",
                        "--unlabeled", "--quiet"], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 1, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and "Rerun the same command" in r.stderr, r.stderr[-2000:]
    assert "s3://nowhere/set/build.json" in r.stderr  # names what it could not read


@pytest.mark.slow
@pytest.mark.s3
def test_an_upload_cut_by_an_outage_is_an_oserror_naming_the_object_and_publishes_nothing(s3_server, proxy):
    """The store goes away while a shard is being uploaded: one error type (OSError) with the object's
    URL, whatever the client library raised, and no half object appears."""
    import s3fs

    from distssl.storage import store

    upload_folder_target = "s3://upload-cut/set/shard-000000.tar"
    s3fs_fresh().mkdir("upload-cut")
    s3fs.S3FileSystem.clear_instance_cache()
    os.environ["AWS_MAX_ATTEMPTS"] = "1"
    try:
        with pytest.raises(OSError, match="upload-cut/set/shard-000000.tar"):
            with store.atomic_write(upload_folder_target) as f:
                f.write(b"x" * 1000)
                proxy.down()  # the upload happens at close, against a store that is gone
    finally:
        os.environ.pop("AWS_MAX_ATTEMPTS", None)
        proxy.up()
    fs = s3fs_fresh()
    assert not fs.exists("upload-cut/set/shard-000000.tar")
