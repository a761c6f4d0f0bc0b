"""Google Cloud Storage and Azure Blob Storage, against their local emulators (gcp-storage-emulator from
PyPI, Azurite from npm) with real processes: a bucket of raw images with corrupt ones becomes shards in
the bucket, a rerun changes no object, and a 2-rank run streams all three sets from it through the local
shard cache. And the outage behaviour proven for S3, for GCS: a proxy that refuses and cuts connections
for a while, then the same batches.

An emulator that cannot start here skips its own tests with the reason (pytest -ra lists it)."""
import json
import logging
import subprocess
import sys
import threading
import time
import warnings

import fsspec
import pytest

from conftest import ROOT, export_digits_with_bad_files, run_train, stream_batches, tiny_overrides
from support.servers import TcpProxy, local_azurite, local_gcs, upload_folder

pytestmark = [pytest.mark.slow, pytest.mark.clouds]


def _started(ctx, what: str):
    try:
        return ctx.__enter__()
    except (RuntimeError, OSError) as e:
        warnings.warn(f"{what} could not start: its tests are skipped ({e})")
        pytest.skip(f"{what} could not start here: {e}")


@pytest.fixture(scope="module")
def gcs():
    ctx = local_gcs()
    url = _started(ctx, "gcp-storage-emulator")
    yield url
    ctx.__exit__(None, None, None)


@pytest.fixture(scope="module")
def azure(tmp_path_factory):
    ctx = local_azurite(tmp_path_factory.mktemp("azurite"))
    conn = _started(ctx, "Azurite")
    yield conn
    ctx.__exit__(None, None, None)


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    return export_digits_with_bad_files(tmp_path_factory.mktemp("raw"), n_train=200, n_eval=40, seed=3)


def _fs(url: str):
    return fsspec.core.url_to_fs(url, skip_instance_cache=True)


def _objects(url: str) -> dict[str, tuple]:
    fs, root = _fs(url)
    return {p: (i["size"], i.get("etag"), str(i.get("updated") or i.get("last_modified")))
            for p, i in fs.find(root, detail=True).items()}


def _shards(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "tools/make_shards.py"), *map(str, args), "--quiet"],
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("store", ["gs", "az"])
def test_bucket_to_shards_rerun_unchanged_and_a_two_rank_run_streams_it_through_the_cache(
        store, request, raw, tmp_path):
    request.getfixturevalue("gcs" if store == "gs" else "azure")
    upload_folder(raw / "train", f"{store}://raw/train")
    upload_folder(raw / "eval", f"{store}://raw/eval")
    dst = f"{store}://shards/d"
    r = _shards(f"{store}://raw/train", f"{dst}/train", "--labels-per-class", 2)
    assert r.returncode == 2 and f"the bucket {store}://shards does not exist" in r.stderr, r.stderr[-2000:]
    _fs(dst)[0].mkdir("shards")
    r = _shards(f"{store}://raw/train", f"{dst}/train", "--labels-per-class", 2, "--max-count", 40, "--workers", 2)
    assert r.returncode == 0, r.stderr[-2000:]
    assert _shards(f"{store}://raw/eval", f"{dst}/eval").returncode == 0
    fs, _ = _fs(dst)
    unl = json.loads(fs.cat_file("shards/d/train/unlabeled/index.json"))
    lab = json.loads(fs.cat_file("shards/d/train/labeled/index.json"))
    assert lab["count"] == 20 and unl["count"] == sum(s["count"] for s in unl["shards"]) == 200
    assert unl["failure_reasons"] == {"empty file": 1, "undecodable": 2}
    before = _objects(dst)
    r = _shards(f"{store}://raw/train", f"{dst}/train", "--labels-per-class", 2, "--max-count", 40)
    assert r.returncode == 0, r.stderr[-2000:]
    assert _objects(dst) == before  # not one object rewritten

    out, cache = tmp_path / "run", tmp_path / "cache"
    data = {"labeled": f"{dst}/train/labeled", "unlabeled": f"{dst}/train/unlabeled", "eval": f"{dst}/eval"}
    r = run_train(tiny_overrides(data, out, **{"train.steps": 4, "train.eval_every": 4, "train.num_workers": 1,
                                               "data.cache_dir": str(cache), "data.cache_limit_gb": 1}), nproc=2)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    ev = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"eval"' in line][-1]
    assert ev["eval_images"] == 40
    cached = sorted(p.name.split("-", 1)[1] for p in cache.glob("*.tar"))
    n_shards = len(lab["shards"]) + len(unl["shards"]) + 1  # every shard both ranks opened, fetched once
    assert len(cached) == n_shards, cached
    assert not list(cache.glob("*.tmp-*"))


def test_gcs_streaming_survives_an_outage_and_yields_the_same_batches(gcs, tiny_data, monkeypatch, caplog):
    upload_folder(tiny_data["unlabeled"], "gs://outage/unlabeled")
    reference = stream_batches("gs://outage/unlabeled", 40)
    proxy = TcpProxy(int(gcs.rsplit(":", 1)[1]))
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.url)
    import gcsfs
    gcsfs.GCSFileSystem.clear_instance_cache()

    def outage():  # 6 s of refused and cut connections: longer than gcsfs's own quick retries
        proxy.down()
        threading.Timer(6.0, proxy.up).start()

    t0 = time.time()
    try:
        with caplog.at_level(logging.WARNING):
            interrupted = stream_batches("gs://outage/unlabeled", 40, outage=outage)
    finally:
        proxy.down()
        gcsfs.GCSFileSystem.clear_instance_cache()
    assert interrupted == reference  # nothing lost, nothing repeated, same order and augmentations
    assert time.time() - t0 >= 5.0  # the outage was waited out, not skipped
