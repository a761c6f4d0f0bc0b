"""The local shard cache (data.cache_dir): remote shards read once are read locally afterwards, the
folder stays under its limit (least recently used copies go), and a bad copy or a cache that cannot
write falls back to the store with a warning, never a crash or wrong data."""
import logging
import os
import subprocess
import sys

import fsspec
import pytest

from conftest import ROOT
from distssl.data.index import resolve
from distssl.data.streams import shard_samples
from distssl.storage.cache import ShardCache
from support.servers import upload_folder


@pytest.fixture
def remote_set(tiny_data, tmp_path):
    """The tiny unlabeled set (12 shards) on fsspec's in-memory store, a remote store to the cache."""
    url = f"memory://cache-{tmp_path.name}/unlabeled"
    upload_folder(tiny_data["unlabeled"], url)
    yield url
    fsspec.filesystem("memory").rm(url.split("://")[1].split("/")[0], recursive=True)


def _read_all(shards) -> dict[str, bytes]:
    return {f"{s}/{raw.key}": raw.fields["png"] for s in range(len(shards.urls)) for raw in shard_samples(shards, s)}


def test_second_read_comes_from_the_cache_even_without_the_store(remote_set, tiny_data, tmp_path):
    shards = resolve(remote_set)
    shards.cache = ShardCache(str(tmp_path / "cache"), limit_gb=1)
    first = _read_all(shards)
    copies = sorted(p.name for p in (tmp_path / "cache").glob("*.tar"))
    assert len(copies) == len(shards.urls) == 12
    assert sum(p.stat().st_size for p in (tmp_path / "cache").glob("*.tar")) == sum(shards.sizes)
    fsspec.filesystem("memory").rm(remote_set.split("://")[1], recursive=True)  # the store is gone
    assert _read_all(shards) == first
    local = resolve(tiny_data["unlabeled"])  # and the bytes are the shards' own
    assert _read_all(local) == first


def test_past_the_limit_the_least_recently_used_copies_go(remote_set, tmp_path):
    shards = resolve(remote_set)
    limit = 3.5 * max(shards.sizes)  # room for three copies
    shards.cache = ShardCache(str(tmp_path / "cache"), limit_gb=limit / 2 ** 30)
    for s in range(len(shards.urls)):
        list(shard_samples(shards, s))
        kept = shards.cache.copies()
        assert sum(n for _, n, _ in kept) <= limit
    assert [p for _, _, p in kept] == [shards.cache.path_for(shards.urls[s]) for s in (9, 10, 11)]
    list(shard_samples(shards, 9))  # used again: now the newest, so shard 10's copy goes next
    list(shard_samples(shards, 0))
    assert {p for _, _, p in shards.cache.copies()} == {shards.cache.path_for(shards.urls[s]) for s in (11, 9, 0)}


@pytest.mark.parametrize("damage", ["flipped byte", "truncated", "hash missing"])
def test_a_bad_copy_is_dropped_and_the_store_read_with_a_warning(remote_set, tmp_path, caplog, damage):
    shards = resolve(remote_set)
    shards.cache = ShardCache(str(tmp_path / "cache"), limit_gb=1)
    first = _read_all(shards)
    copy = shards.cache.path_for(shards.urls[3])
    original = copy.read_bytes()
    data = bytearray(original)
    if damage == "flipped byte":
        data[len(data) // 2] ^= 0x40  # inside an image: no tar checksum would see it
        copy.write_bytes(bytes(data))
    elif damage == "truncated":
        copy.write_bytes(bytes(data[:-700]))
    else:
        copy.with_name(copy.name + ".sha256").unlink()
    with caplog.at_level(logging.WARNING):
        again = _read_all(shards)
    assert again == first
    assert any("is damaged" in r.getMessage() and copy.name in r.getMessage() for r in caplog.records)
    assert copy.read_bytes() == original  # fetched again, whole


def test_a_shard_larger_than_the_limit_is_read_uncached(remote_set, tmp_path, caplog):
    shards = resolve(remote_set)
    shards.cache = ShardCache(str(tmp_path / "cache"), limit_gb=100 / 2 ** 30)  # 100 bytes
    with caplog.at_level(logging.WARNING):
        assert _read_all(shards)
    assert not list((tmp_path / "cache").glob("*.tar"))
    assert sum("smaller than one shard" in r.getMessage() for r in caplog.records) == 1


WRITE_FAILS = """
import resource, signal, sys
from distssl.storage.cache import ShardCache
from distssl.data.index import resolve
from distssl.data.streams import shard_samples
from support.servers import upload_folder
upload_folder(sys.argv[1], "memory://full/unlabeled")
shards = resolve("memory://full/unlabeled")
shards.cache = ShardCache(sys.argv[2], limit_gb=1)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (2000, 2000))  # every file this process writes stops at 2 kB
n = sum(1 for s in range(len(shards.urls)) for _ in shard_samples(shards, s))
print("samples", n)
"""


@pytest.mark.slow
def test_a_cache_that_cannot_write_falls_back_to_the_store(tiny_data, tmp_path):
    """A disk that refuses writes (the OS's own file-size limit: EFBIG, as ENOSPC would come)."""
    r = subprocess.run([sys.executable, "-c", WRITE_FAILS, tiny_data["unlabeled"], str(tmp_path / "cache")],
                       capture_output=True, text=True, timeout=120, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": os.pathsep.join(  # support.servers, under tests/
                           filter(None, [str(ROOT / "tests"), os.environ.get("PYTHONPATH")]))})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "samples 600" in r.stdout
    assert r.stderr.count("reading shards from the store instead") == 1, r.stderr[-2000:]
    assert not list((tmp_path / "cache").glob("*.tar"))
