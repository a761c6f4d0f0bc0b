"""Corpora that grow: a recorded plan, refusals that touch nothing, --extend, --dedup (real processes)."""
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path

import pytest

from conftest import ROOT, export_digits


def _cli(*args, timeout=300):
    return subprocess.run([sys.executable, str(ROOT / "tools/make_shards.py"), *map(str, args), "--quiet"],
                          capture_output=True, text=True, timeout=timeout)


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _source_hashes(folder: Path) -> Counter:
    return Counter(hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*.png"))


def _samples(folder: Path) -> list[dict]:
    """Every sample's json, with the sha256 of the image bytes actually stored."""
    out = []
    for tar in sorted(folder.glob("*.tar")):
        with tarfile.open(tar) as t:
            members = {m.name: t.extractfile(m).read() for m in t.getmembers()}
        for name, data in members.items():
            if name.endswith(".json"):
                meta = json.loads(data)
                meta["stored_sha256"] = hashlib.sha256(members[name[:-4] + "png"]).hexdigest()
                out.append(meta)
    return out


def _add_images(src: Path, donor: Path, n: int, prefix: str) -> list[Path]:
    added = []
    for i, p in enumerate(sorted(donor.rglob("*.png"))[:n]):
        dst = src / p.parent.name / f"{prefix}{i:03d}.png"
        dst.parent.mkdir(exist_ok=True)
        shutil.copy(p, dst)
        added.append(dst)
    return added


@pytest.fixture(params=["whole", "partitioned"])
def part(request) -> list[str]:
    """The builder's options for one listing in memory, or listed, planned and recorded in partitions of
    about 60 keys (the path of buckets too large for one process, distssl.shards.partitions)."""
    return [] if request.param == "whole" else ["--partition-keys", "60"]


@pytest.fixture
def raw(tmp_path):
    export_digits(tmp_path / "raw", n_train=400, n_eval=60, seed=3)
    return tmp_path / "raw"


@pytest.mark.slow
def test_source_grown_after_a_killed_build_is_refused_then_extended_exactly_once(raw, tmp_path, part):
    src, dst = raw / "train", tmp_path / "shards"
    cmd = [sys.executable, str(ROOT / "tools/make_shards.py"), src, dst, "--unlabeled", "--max-count", "10", "--quiet",
           *part]
    proc = subprocess.Popen(list(map(str, cmd)))
    deadline = time.time() + 120
    while not list(dst.glob("shard-*.stats.json")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (dst / "build.json").exists() and not (dst / "index.json").exists(), "the build was not killed mid-way"
    planned = json.loads((dst / "build.json").read_text())["generations"][0]["sets"][""]["shards"]
    written = len(list(dst.glob("shard-*.stats.json")))
    assert 0 < written < planned and planned >= 40

    _add_images(src, raw / "eval", 30, "new_")
    before = _tree(dst)
    r = _cli(src, dst, "--unlabeled", "--max-count", 10, *part)
    assert r.returncode == 2 and "30 inputs added, 0 removed" in r.stderr and "--extend" in r.stderr, r.stderr
    assert _tree(dst) == before  # refused before writing anything

    r = _cli(src, dst, "--unlabeled", "--max-count", 10, "--extend", *part)
    assert r.returncode == 0, r.stderr
    index = json.loads((dst / "index.json").read_text())
    samples = _samples(dst)
    assert index["count"] == len(samples) == 430 and index["generations"] == 2
    # every source image exactly once by content, each json carrying the hash of its original bytes
    assert Counter(s["sha256"] for s in samples) == _source_hashes(src)
    assert all(s["sha256"] == s["stored_sha256"] for s in samples)
    # the killed plan was finished as planned: its shards first, the 30 new images after them
    assert [s["name"] for s in index["shards"]][:planned] == [f"shard-{i:06d}.tar" for i in range(planned)]
    assert sum(s["count"] for s in index["shards"][:planned]) == 400
    assert sum(s["count"] for s in index["shards"][planned:]) == 30

    done = _tree(dst)
    r = _cli(src, dst, "--unlabeled", "--max-count", 10, *part)  # the extended build is now the recorded one
    assert r.returncode == 0, r.stderr
    assert _tree(dst) == done


@pytest.mark.slow
def test_extend_a_finished_split_build_keeps_labels_and_reports_removed_and_known_content(raw, tmp_path, part):
    src, dst = raw / "train", tmp_path / "shards"
    args = [src, dst, "--labels-per-class", 2, "--eval-fraction", 0.1, "--max-count", 25, *part]
    assert _cli(*args).returncode == 0
    labeled_before = _tree(dst / "labeled")
    old_unlabeled = {p.name: p.read_bytes() for p in (dst / "unlabeled").glob("shard-*.tar")}

    _add_images(src, raw / "eval", 40, "new_")
    copy_of_existing = src / "5" / "renamed.png"
    shutil.copy(sorted((src / "5").glob("*.png"))[0], copy_of_existing)  # same bytes, new name
    labeled = {s["path"] for s in _samples(dst / "labeled")}
    gone = next(p for p in sorted((src / "7").glob("*.png"))[::-1] if f"7/{p.name}" not in labeled)
    gone.unlink()  # an unlabeled one: the labeled set, its index included, must stay as it is
    r = _cli(*args)
    assert r.returncode == 2 and "41 inputs added, 1 removed" in r.stderr, r.stderr
    r = _cli(*args, "--extend")
    assert r.returncode == 0, r.stderr
    assert "1 inputs of the build are gone from the source" in r.stderr  # removed: reported, not hidden

    assert _tree(dst / "labeled") == labeled_before  # the labeled split is left as it is
    for name, body in old_unlabeled.items():  # existing shards untouched
        assert (dst / "unlabeled" / name).read_bytes() == body
    ev, unl = (json.loads((dst / s / "index.json").read_text()) for s in ("eval", "unlabeled"))
    samples = {s: _samples(dst / s) for s in ("eval", "labeled", "unlabeled")}
    assert ev["count"] == len(samples["eval"]) and unl["count"] == len(samples["unlabeled"])
    # the 40 new images went to eval (their stratified fraction) or unlabeled, each once
    new = [s for s in samples["eval"] + samples["unlabeled"] if "/new_" in s["path"]]
    assert len(new) == 40 and len({s["sha256"] for s in new}) == 40
    assert 0 < sum("/new_" in s["path"] for s in samples["eval"]) < 40
    # the renamed copy is known by content: a counted duplicate, not a second sample
    dup = [f for f in unl["failures"] if f["input"] == "5/renamed.png"]
    assert len(dup) == 1 and dup[0]["reason"].startswith("duplicate of ") and unl["duplicates"] == 1
    where, key = dup[0]["reason"].removeprefix("duplicate of ").split("/")
    assert any(s["sha256"] == hashlib.sha256(copy_of_existing.read_bytes()).hexdigest()
               for s in samples[where])
    assert unl["removed_inputs"] == 1 and ev["generations"] == 2


@pytest.mark.slow
def test_options_changed_since_the_build_are_refused_with_what_changed(raw, tmp_path):
    src, dst = raw / "eval", tmp_path / "shards"
    assert _cli(src, dst, "--max-count", 20).returncode == 0
    before = _tree(dst)
    r = _cli(src, dst, "--max-count", 30)
    assert r.returncode == 2 and "max_count: 20 -> 30" in r.stderr and "new destination" in r.stderr
    r = _cli(src, dst, "--max-count", 20, "--max-size", 16)
    assert r.returncode == 2 and "max_size" in r.stderr
    assert _tree(dst) == before


@pytest.mark.slow
def test_dedup_keeps_the_eval_copy_then_the_labeled_one_and_counts_the_rest(raw, tmp_path, part):
    src = raw / "train"
    originals = sorted(src.rglob("*.png"))[:15]
    for i, p in enumerate(originals):  # exact copies under new names, in the same class
        shutil.copy(p, p.parent / f"copy_{i:02d}.png")
    shutil.copy(originals[0], originals[0].parent / "copy_again.png")
    dst = tmp_path / "dd"
    r = _cli(src, dst, "--labels-per-class", 3, "--eval-fraction", 0.2, "--max-count", 40, "--dedup", *part)
    assert r.returncode == 0, r.stderr
    samples = {s: _samples(dst / s) for s in ("eval", "labeled", "unlabeled")}
    where: dict[str, list[str]] = {}
    for split, items in samples.items():
        for s in items:
            where.setdefault(s["sha256"], []).append(split)
    assert all(v in (["eval"], ["labeled", "unlabeled"], ["unlabeled"]) for v in where.values()), where
    assert len(where) == len(_source_hashes(src))  # every distinct content kept once
    indexes = {s: json.loads((dst / s / "index.json").read_text()) for s in samples}
    assert sum(i["duplicates"] for i in indexes.values()) == 16  # 15 copies + 1 copy of a copy
    dups = [f for i in indexes.values() for f in i["failures"] if f["reason"].startswith("duplicate of")]
    assert len(dups) == 16 and all("/" in f["reason"] for f in dups)
    # an eval image never trains: a content in eval has no copy anywhere else
    eval_hashes = {s["sha256"] for s in samples["eval"]}
    assert not eval_hashes & {s["sha256"] for s in samples["unlabeled"] + samples["labeled"]}
    assert "duplicate" in json.loads((dst / "unlabeled/index.json").read_text())["failure_reasons"] or \
        "duplicate" in indexes["eval"]["failure_reasons"]


@pytest.mark.slow
def test_shards_without_a_build_record_are_not_added_to(raw, tmp_path):
    dst = tmp_path / "old"
    assert _cli(raw / "eval", dst, "--max-count", 20).returncode == 0
    os.remove(dst / "build.json")
    r = _cli(raw / "eval", dst, "--max-count", 20)
    assert r.returncode == 2 and "no build.json" in r.stderr
