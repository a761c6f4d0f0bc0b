"""Raw bucket -> shards -> training, against a real S3-protocol server on localhost (moto)."""
import json
import subprocess
import sys
import time
from collections import Counter

import pytest

from conftest import ROOT, export_digits_with_bad_files, run_train, s3fs_fresh, tiny_overrides
from support.servers import upload_folder


@pytest.fixture(scope="module")
def raw_bucket(s3_server, tmp_path_factory):

    local = export_digits_with_bad_files(tmp_path_factory.mktemp("raw"), n_train=300, n_eval=60, seed=1)
    upload_folder(local, "s3://raw")
    return local


def _cli(*args, **kw):
    return subprocess.run([sys.executable, str(ROOT / "tools/make_shards.py"), *args, "--quiet"],
                          capture_output=True, text=True, timeout=300, **kw)


def _objects(bucket):
    import boto3
    s3 = boto3.client("s3")
    out = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for o in page.get("Contents", []):
            out[o["Key"]] = (o["Size"], o["ETag"], o["LastModified"])
    return out


def _keys_in_shards(fs, prefix):
    import tarfile
    keys = []
    for p in sorted(fs.find(prefix)):
        if p.endswith(".tar"):
            with fs.open(p, "rb") as f, tarfile.open(fileobj=f, mode="r|") as t:
                keys += [json.loads(t.extractfile(m).read())["path"] for m in t if m.name.endswith(".json")]
    return keys


@pytest.mark.slow
@pytest.mark.s3
def test_bucket_to_shards_exact_counts_failures_listed_and_rerun_idempotent(raw_bucket):
    import boto3
    boto3.client("s3").create_bucket(Bucket="shards1")
    r = _cli("s3://raw/train", "s3://shards1/train", "--labels-per-class", "3", "--max-count", "50",
             "--workers", "2")
    assert r.returncode == 0, r.stderr
    assert "inputs skipped" in r.stdout
    fs = s3fs_fresh()
    lab = json.loads(fs.cat("shards1/train/labeled/index.json"))
    unl = json.loads(fs.cat("shards1/train/unlabeled/index.json"))
    assert lab["count"] == 30 and lab["class_histogram"] == [3] * 10
    assert unl["count"] == 300 and unl["includes_labeled"]  # every good image, the labeled ones too
    assert unl["num_failures"] == 3 and unl["failure_reasons"] == {"empty file": 1, "undecodable": 2}
    unlabeled_keys = _keys_in_shards(fs, "shards1/train/unlabeled")
    labeled_keys = _keys_in_shards(fs, "shards1/train/labeled")
    assert len(unlabeled_keys) == len(set(unlabeled_keys)) == 300 and set(labeled_keys) <= set(unlabeled_keys)
    assert "testing-secret" not in json.dumps(unl) + json.dumps(lab)
    before = _objects("shards1")
    r = _cli("s3://raw/train", "s3://shards1/train", "--labels-per-class", "3", "--max-count", "50")
    assert r.returncode == 0, r.stderr
    assert _objects("shards1") == before  # not one object rewritten


@pytest.mark.slow
@pytest.mark.s3
def test_a_killed_build_rerun_finishes_with_every_image_once(raw_bucket, tmp_path):
    import boto3
    boto3.client("s3").create_bucket(Bucket="shards2")
    cmd = [sys.executable, str(ROOT / "tools/make_shards.py"), "s3://raw/train", "s3://shards2/set",
           "--unlabeled", "--max-count", "10", "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    fs = s3fs_fresh()
    deadline = time.time() + 120
    while time.time() < deadline:
        fs.invalidate_cache()
        if len([p for p in fs.find("shards2/set") if p.endswith(".stats.json")]) >= 3:
            break
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    fs.invalidate_cache()
    assert not fs.exists("shards2/set/index.json"), "the build finished before it could be killed"
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    fs.invalidate_cache()
    idx = json.loads(fs.cat("shards2/set/index.json"))
    keys = _keys_in_shards(fs, "shards2/set")
    assert idx["count"] == len(keys) == len(set(keys)) == 300
    assert Counter(k.split("/")[0] for k in keys) == Counter(
        q.relative_to(raw_bucket / "train").parts[0] for q in (raw_bucket / "train").rglob("*.png")
        if "bad" not in q.name)


@pytest.mark.slow
@pytest.mark.s3
def test_training_streams_shards_from_s3(raw_bucket, tmp_path):
    import boto3
    boto3.client("s3").create_bucket(Bucket="shards3")
    assert _cli("s3://raw/train", "s3://shards3/train", "--labels-per-class", "2", "--max-count", "60").returncode == 0
    assert _cli("s3://raw/eval", "s3://shards3/eval").returncode == 0
    data = {"labeled": "s3://shards3/train/labeled", "unlabeled": "s3://shards3/train/unlabeled",
            "eval": "s3://shards3/eval"}
    out = tmp_path / "run"
    r = run_train(tiny_overrides(data, out, **{"train.steps": 3, "train.eval_every": 3, "train.num_workers": 1}))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    ev = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if '"eval"' in l][-1]
    assert ev["eval_images"] == 60
    assert "testing-secret" not in (out / "config.yaml").read_text()
