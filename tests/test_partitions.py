"""Listings too large for one process: partitions by a hash of the key, spilled to disk, one in memory at a
time; the splits divided between partitions exactly (split_quota); the same sets, per class, as the
unpartitioned build's."""
import csv
import json

import numpy as np
import pytest
from PIL import Image

from conftest import export_digits, export_digits_with_bad_files
from distssl.shards import make_shards
from distssl.shards.listing import list_inputs
from distssl.shards.partitions import bucket_of, group_buckets, list_partitioned
from distssl.shards.splits import split_quota


def test_quotas_share_each_class_exactly_and_in_proportion():
    rng = np.random.default_rng(0)
    for _ in range(200):
        P, C = rng.integers(1, 9), rng.integers(1, 6)
        counts = rng.integers(0, 30, size=(P, C))
        want = rng.integers(0, 60, size=C)
        q = split_quota(counts, want, np.random.default_rng(1))
        assert (q.sum(axis=0) == np.minimum(want, counts.sum(axis=0))).all()
        assert (q >= 0).all() and (q <= counts).all()
        share = counts * (np.minimum(want, counts.sum(0)) / np.maximum(counts.sum(0), 1))[None, :]
        assert (np.abs(q - share) < 1 + 1e-9).all()  # largest remainder: each cell within one of its share
    assert (split_quota(counts, want, np.random.default_rng(1)) == q).all()  # a pure function of its seed


def test_bucket_ranges_hold_at_most_the_partition_size_and_cover_every_bucket():
    counts = np.random.default_rng(0).integers(0, 50, size=4096)
    ranges = group_buckets(counts, 1000)
    assert ranges[0][0] == 0 and ranges[-1][1] == 4096
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    assert all(counts[b0:b1].sum() <= 1000 or b1 - b0 == 1 for b0, b1 in ranges)
    assert group_buckets(counts, 10**9) == [(0, 4096)]
    assert bucket_of("class_0001/img_000000001.jpg") == bucket_of("class_0001/img_000000001.jpg")


@pytest.mark.parametrize("kind", ["folder", "manifest"])
def test_one_partition_loads_as_the_in_memory_listing_and_many_cover_it_once(tmp_path, kind):
    export_digits(tmp_path / "raw", n_train=300, n_eval=0)
    src = tmp_path / "raw/train"
    if kind == "manifest":  # file order, labels by name
        rows = [{"path": str(p.relative_to(src)), "label": p.parent.name} for p in sorted(src.rglob("*.png"))[::-1]]
        with open(tmp_path / "m.csv", "w", newline="") as f:
            w = csv.DictWriter(f, ["path", "label"])
            w.writeheader()
            w.writerows(rows)
        src = tmp_path / "m.csv"
    whole = list_inputs(str(src))
    one = list_partitioned(str(src), str(tmp_path / "one"), 10**6)
    assert one.partitions == 1
    got = one.load(0)
    assert (got.rels, got.labels.tolist(), got.sizes.tolist(), got.class_names) == \
        (whole.rels, whole.labels.tolist(), whole.sizes.tolist(), whole.class_names)
    many = list_partitioned(str(src), str(tmp_path / "many"), 40)
    assert many.partitions >= 8 and max(many.sizes()) <= 40 + max(many.spill.counts)
    parts = [many.load(p) for p in range(many.partitions)]
    seen = sorted((r, int(lb)) for part in parts for r, lb in zip(part.rels, part.labels))
    assert seen == sorted(zip(whole.rels, whole.labels.tolist()))
    assert (many.class_counts.sum(axis=0) == np.bincount(whole.labels, minlength=10)).all()


def test_a_partitioned_build_splits_exactly_as_the_whole_one_per_class(tmp_path):
    """Partitions of ~50 keys: the same eval images per class (round(fraction x class)), the same labels per
    class, every good image once, corrupt ones never labeled, skipped and counted."""
    raw = export_digits_with_bad_files(tmp_path / "raw", n_train=500, n_eval=0, seed=1)
    kw = dict(labels_per_class=4, eval_fraction=0.1, max_count=30, progress=False)
    whole = make_shards(str(raw / "train"), str(tmp_path / "whole"), **kw)
    parted = make_shards(str(raw / "train"), str(tmp_path / "parted"), partition_keys=50, **kw)
    record = json.loads((tmp_path / "parted/build.json").read_text())["generations"][0]
    assert len(record["parts"]) >= 9  # planned and recorded partition by partition
    for name in ("eval", "labeled", "unlabeled"):
        assert parted[name]["class_histogram"] == whole[name]["class_histogram"], name
        assert parted[name]["count"] == whole[name]["count"]
    assert parted["labeled"]["class_histogram"] == [4] * 10
    labeled = _paths(tmp_path / "parted/labeled")
    assert not any("bad_" in p for p in labeled)
    unlabeled, evals = _paths(tmp_path / "parted/unlabeled"), _paths(tmp_path / "parted/eval")
    assert not set(unlabeled) & set(evals) and set(labeled) <= set(unlabeled)
    assert len(unlabeled) + len(evals) == 500  # every good image once, eval held out
    bad = [f for f in parted["unlabeled"]["failures"] if "bad_" in f["input"]]
    assert len(bad) == 3 and parted["unlabeled"]["num_failures"] == whole["unlabeled"]["num_failures"] == 3
    # a rerun of the finished partitioned build writes nothing
    before = {p: p.read_bytes() for p in (tmp_path / "parted").rglob("*") if p.is_file()}
    make_shards(str(raw / "train"), str(tmp_path / "parted"), partition_keys=50, **kw)
    assert {p: p.read_bytes() for p in (tmp_path / "parted").rglob("*") if p.is_file()} == before
    dry = make_shards(str(raw / "train"), str(tmp_path / "dry"), partition_keys=50, dry_run=True, **kw)
    assert {k: v["count"] for k, v in dry.items()} == {k: v["planned"] for k, v in record["sets"].items()}
    assert not (tmp_path / "dry").exists()


def _paths(folder) -> list[str]:
    import tarfile

    out = []
    for tar in sorted(folder.glob("*.tar")):
        with tarfile.open(tar) as t:
            out += [json.loads(t.extractfile(m).read())["path"] for m in t.getmembers() if m.name.endswith(".json")]
    return out


def _as_written_before_partitions(dst) -> None:
    """Rewrite a one-partition record as builds wrote it before partitions existed: one file per generation
    (build-gNNN.json.gz) named by the head's "file", no bucket ranges or digests."""
    head = json.loads((dst / "build.json").read_text())
    for g, gen in enumerate(head["generations"]):
        (entry,) = gen["parts"]
        (dst / entry["file"]).rename(dst / f"build-g{g:03d}.json.gz")
        head["generations"][g] = {"file": f"build-g{g:03d}.json.gz",
                                  **{k: entry[k] for k in ("inputs", "removed", "sets")}}
    (dst / "build.json").write_text(json.dumps(head, indent=1))


def test_a_record_written_before_partitions_is_finished_refused_on_change_and_extended(tmp_path):
    raw = tmp_path / "raw"
    export_digits(raw, n_train=300, n_eval=0, seed=2)
    kw = dict(labels_per_class=3, eval_fraction=0.1, max_count=40, progress=False)
    first = make_shards(str(raw / "train"), str(tmp_path / "old"), **kw)
    dst = tmp_path / "old"
    _as_written_before_partitions(dst)
    for tar in sorted((dst / "unlabeled").glob("*.tar"))[-2:]:  # killed before its last shards were written
        tar.unlink()
        tar.with_suffix(".stats.json").unlink()
    again = make_shards(str(raw / "train"), str(dst), **kw)  # finishes the recorded plan, nothing new
    assert {k: v["count"] for k, v in again.items()} == {k: v["count"] for k, v in first.items()}
    labeled = sorted(p.read_bytes() for p in (dst / "labeled").iterdir())
    src = raw / "train"
    for i, p in enumerate(sorted(src.rglob("*.png"))[:10]):  # new inputs: the pixels of old ones, moved a bit
        Image.open(p).rotate(90).save(p.parent / f"new_{i}.png")
    with pytest.raises(ValueError, match="10 inputs added, 0 removed"):
        make_shards(str(src), str(dst), **kw)
    grown = make_shards(str(src), str(dst), extend=True, **kw)
    before = first["eval"]["count"] + first["unlabeled"]["count"]
    assert grown["eval"]["count"] + grown["unlabeled"]["count"] == before + 10
    assert sorted(p.read_bytes() for p in (dst / "labeled").iterdir()) == labeled  # the labeled split stays
    gens = json.loads((dst / "build.json").read_text())["generations"]
    assert "file" in gens[0] and "parts" in gens[1]  # the old generation read as it was, the new one appended
    assert grown["unlabeled"]["generations"] == 2
