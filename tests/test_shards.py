"""The shard builder and the stream readers, on real MNIST digits."""
import json
import shutil
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch

from conftest import ROOT, export_digits
from distssl.cli import shards as shards_cli
from distssl.data.index import ShardSet, resolve
from distssl.data.samples import eval_item, labeled_item, unlabeled_item
from distssl.data.streams import EvalStream, TrainStream
from distssl.data.transforms import Views
from distssl.errors import OptionError
from distssl.shards import BuildOptions, ImageOptions, make_shards

VIEWS = Views(image_size=28, flip=False, pad_fraction=0.125, randaugment_ops=2, cutout_fraction=0.5)


@pytest.fixture(scope="module")
def raw_with_corrupt(tmp_path_factory):
    root = tmp_path_factory.mktemp("raw")
    export_digits(root, n_train=200, n_eval=0)
    one = next((root / "train/3").iterdir())
    (root / "train/3/bad_truncated.png").write_bytes(one.read_bytes()[:60])
    (root / "train/3/bad_empty.png").write_bytes(b"")
    (root / "train/7/bad_text.png").write_bytes(b"not an image at all")
    return root / "train"


def test_labeled_split_is_stratified_and_corrupt_images_are_skipped_and_counted(raw_with_corrupt, tmp_path):
    dst = tmp_path / "out"
    sets = make_shards(str(raw_with_corrupt), str(dst), labels_per_class=3, max_count=40, progress=False)
    lab, unl = (json.loads((dst / s / "index.json").read_text()) for s in ("labeled", "unlabeled"))
    assert lab["count"] == 30 and lab["class_histogram"] == [3] * 10
    assert unl["count"] == 200 and unl["includes_labeled"]  # every good image once, the labeled ones too
    assert unl["num_failures"] == 3 and len(unl["failures"]) == 3
    reasons = " ".join(f["reason"] for f in unl["failures"])
    assert "empty" in reasons and "undecodable" in reasons
    assert sorted(f["input"] for f in unl["failures"]) == ["3/bad_empty.png", "3/bad_truncated.png", "7/bad_text.png"]
    assert (dst / "unlabeled/failures.jsonl").read_text().count("\n") == 3
    assert sum(s["count"] for s in unl["shards"]) == unl["count"] and len(unl["shards"]) == 6  # 203 planned / 40
    assert all(s["count"] <= 40 for s in unl["shards"])
    assert not list(dst.rglob("*.tmp-*"))  # nothing half-written is left behind
    assert unl["failure_reasons"] == {"empty file": 1, "undecodable": 2}
    assert sets["labeled"]["count"] == 30
    paths = {name: _paths_in_set(dst / name) for name in ("labeled", "unlabeled")}
    assert paths["labeled"] <= paths["unlabeled"] and len(paths["unlabeled"]) == 200


def _paths_in_set(folder: Path) -> set[str]:
    out = set()
    for tar in folder.glob("*.tar"):
        with tarfile.open(tar) as t:
            out |= {json.loads(t.extractfile(m).read())["path"] for m in t.getmembers() if m.name.endswith(".json")}
    return out


@pytest.mark.slow
def test_labeled_images_can_be_left_out_of_the_unlabeled_set(raw_with_corrupt, tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "tools/make_shards.py"), str(raw_with_corrupt), str(tmp_path / "o"),
                        "--labels-per-class", "3", "--max-count", "40", "--exclude-labeled", "--quiet"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    lab, unl = (json.loads((tmp_path / "o" / s / "index.json").read_text()) for s in ("labeled", "unlabeled"))
    assert lab["count"] == 30 and unl["count"] == 170 and not unl["includes_labeled"]
    assert not _paths_in_set(tmp_path / "o/labeled") & _paths_in_set(tmp_path / "o/unlabeled")


def test_shards_hold_images_cls_and_json_only_and_unlabeled_has_no_cls(raw_with_corrupt, tmp_path):
    dst = tmp_path / "out"
    make_shards(str(raw_with_corrupt), str(dst), labels_per_class=3, max_count=40, progress=False)
    with tarfile.open(dst / "labeled/shard-000000.tar") as t:
        exts = Counter(n.split(".", 1)[1] for n in t.getnames())
    assert exts == {"png": 30, "cls": 30, "json": 30}
    with tarfile.open(dst / "unlabeled/shard-000000.tar") as t:
        names = t.getnames()
        meta = json.loads(t.extractfile(next(n for n in names if n.endswith(".json"))).read())
    assert not any(n.endswith(".cls") for n in names)
    assert 0 <= meta["label"] <= 9  # kept only for measuring pseudo-label accuracy


def test_build_is_deterministic_and_a_rerun_changes_nothing(raw_with_corrupt, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        make_shards(str(raw_with_corrupt), str(d), labels_per_class=3, max_count=40, seed=5, progress=False)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    # a killed build: one shard and the index missing -> rerun completes it identically
    before = {f: (a / f).read_bytes() for f in files}
    (a / "unlabeled/shard-000002.stats.json").unlink()  # killed before its stats: rewritten
    (a / "unlabeled/shard-000003.tar").write_bytes(b"half")  # killed mid-write (no stats): rewritten
    (a / "unlabeled/shard-000003.stats.json").unlink()
    (a / "unlabeled/index.json").unlink()
    make_shards(str(raw_with_corrupt), str(a), labels_per_class=3, max_count=40, seed=5, progress=False)
    assert {f: (a / f).read_bytes() for f in files} == before


def test_builder_refuses_bad_input_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        make_shards(str(tmp_path / "missing"), str(tmp_path / "o"), progress=False)
    (tmp_path / "flat").mkdir()
    shutil.copy(Path(__file__), tmp_path / "flat/x.txt")
    with pytest.raises(ValueError, match="no images"):
        make_shards(str(tmp_path / "flat"), str(tmp_path / "o"), unlabeled=True, progress=False)


def test_eval_stream_counts_every_image_once_across_ranks_and_workers(tiny_data):
    shards = resolve(tiny_data["eval"])  # 97 images in 3 shards
    assert shards.total == 97
    for world in (1, 2, 4):  # 4 > shard count: split by sample instead of by shard
        keys = []
        for rank in range(world):
            for b in EvalStream(shards, rank=rank, world_size=world, batch_size=8, make_item=eval_item(VIEWS)):
                keys += b["x"].flatten(1).sum(1).tolist() if "x" in b else []
        assert len(keys) == 97, world
    tiny = ShardSet(spec="last", urls=shards.urls[-1:])  # the last shard alone: 17 images
    n = sum(len(b.get("y", [])) for rank in range(32)
            for b in EvalStream(tiny, rank=rank, world_size=32, batch_size=8, make_item=eval_item(VIEWS)))
    assert n == 17  # an eval set smaller than the world: every image once, the ranks without one idle


def _take(stream, n):
    out = []
    for b in stream:
        out.append(b)
        if len(out) == n:
            return out


@pytest.mark.parametrize("interleave_shards,counts_known", [(1, True), (4, True), (4, False)])
def test_train_stream_resumes_exactly_from_a_cursor(tiny_data, interleave_shards, counts_known):
    shards = resolve(tiny_data["unlabeled"])
    if not counts_known:  # a brace pattern without index.json: shards are replayed to the cursor
        shards = ShardSet(spec="pattern", urls=shards.urls)
    make = unlabeled_item(VIEWS)
    kw = dict(rank=1, world_size=2, batch_size=7, seed=3, shuffle_buffer=16, make_item=make,
              interleave_shards=interleave_shards)
    full = _take(TrainStream(shards, **kw), 20)
    cursor = full[11]["cursor"]
    assert 0 < cursor % 50  # mid-shard (mid-group with 4 shards open)
    resumed = _take(TrainStream(shards, **kw, cursors={1: cursor}), 8)
    for a, b in zip(full[12:], resumed):
        assert torch.equal(a["weak"], b["weak"]) and torch.equal(a["strong"], b["strong"])
        assert torch.equal(a["y_true"], b["y_true"])


def test_train_stream_ranks_see_disjoint_samples_within_an_epoch(tiny_data):
    shards = resolve(tiny_data["labeled"])  # 20 samples in 1 shard -> shared, with other shuffles
    unl = resolve(tiny_data["unlabeled"])  # 600 samples in 12 shards
    per_epoch = {}
    for rank in (0, 1):
        batches = _take(TrainStream(unl, rank=rank, world_size=2, batch_size=10, seed=0, shuffle_buffer=8,
                                    make_item=lambda raw, rng: {"k": int(raw.key.rsplit("/", 1)[-1])}), 20)
        per_epoch[rank] = {k for b in batches for k in b["k"].tolist()}
    assert len(per_epoch[0]) == 200 and len(per_epoch[1]) == 200
    assert not per_epoch[0] & per_epoch[1]
    lab = _take(TrainStream(shards, rank=0, world_size=2, batch_size=4, seed=0, shuffle_buffer=8,
                            make_item=labeled_item(VIEWS)), 3)
    assert all(b["x"].dtype == torch.uint8 and b["x"].shape == (4, 3, 28, 28) for b in lab)


def _shard_of(shards: ShardSet):
    """Sample key -> shard number: the builder numbers keys consecutively through the shards."""
    import bisect
    import itertools

    ends = list(itertools.accumulate(shards.counts))
    return lambda key: bisect.bisect_right(ends, key)


def test_batches_mix_many_shards_and_batch_mates_change_between_epochs(tiny_data):
    unl = resolve(tiny_data["unlabeled"])  # 600 samples in 12 shards of 50
    shard_of = _shard_of(unl)
    key_item = lambda raw, rng: {"k": int(raw.key.rsplit("/", 1)[-1])}  # noqa: E731

    def epochs(interleave_shards):
        batches = _take(TrainStream(unl, rank=0, world_size=1, batch_size=20, seed=0, shuffle_buffer=64,
                                    make_item=key_item, interleave_shards=interleave_shards), 60)
        keys = [b["k"].tolist() for b in batches]
        return keys[:30], keys[30:]  # 600 samples per epoch

    first, second = epochs(6)
    for epoch in (first, second):
        flat = [k for b in epoch for k in b]
        assert sorted(flat) == list(range(600))  # every sample once per epoch
    shards_per_batch = [len({shard_of(k) for k in b}) for b in first + second]
    assert sum(shards_per_batch) / len(shards_per_batch) >= 5  # of the 6 shards open at once
    one_at_a_time = [len({shard_of(k) for k in b}) for b in epochs(1)[0]]
    assert max(one_at_a_time) <= 2  # the old behaviour: a batch from one shard (two at a boundary)

    def mates(epoch):
        return {k: set(b) - {k} for b in epoch for k in b}

    m1, m2 = mates(first), mates(second)
    overlap = sum(len(m1[k] & m2[k]) for k in m1) / sum(len(m1[k]) for k in m1)
    assert overlap < 0.15  # batch-mates change from epoch to epoch (0.31 with one shard at a time)
    shards_met = [len({shard_of(j) for j in m1[k] | m2[k]}) for k in m1]
    # over two epochs an image meets most of the 12 shards (1.4 one at a time)
    assert sum(shards_met) / len(shards_met) > 6


def test_manifest_fractions_resize_and_format(tmp_path):
    import csv

    from PIL import Image

    export_digits(tmp_path / "raw", n_train=100, n_eval=0, seed=2)
    big = tmp_path / "raw/big.png"
    Image.new("RGB", (300, 120), (200, 10, 10)).save(big)
    rows = [{"path": str(p.relative_to(tmp_path)), "label": f"digit{p.parent.name}"}
            for p in sorted((tmp_path / "raw/train").rglob("*.png"))]
    rows.append({"path": str(big.relative_to(tmp_path)), "label": "digit0"})
    with open(tmp_path / "manifest.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["path", "label"])
        w.writeheader()
        w.writerows(rows)
    from distssl.shards import BuildOptions, ImageOptions
    opts = BuildOptions(label_fraction=0.2, eval_fraction=0.1, image=ImageOptions(max_size=64, format="jpg"),
                        progress=False)
    sets = make_shards(str(tmp_path / "manifest.csv"), str(tmp_path / "out"), opts)
    assert set(sets) == {"eval", "labeled", "unlabeled"}
    assert sets["eval"]["count"] + sets["unlabeled"]["count"] == 101  # unlabeled: every training image
    assert sets["labeled"]["class_names"][0] == "digit0"
    # 20% of each class labeled (rounded), eval carved out first
    assert 0.15 < sets["labeled"]["count"] / 91 < 0.25
    for name in ("eval", "labeled", "unlabeled"):
        for s in sets[name]["shards"]:
            with tarfile.open(tmp_path / "out" / name / s["name"]) as t:
                for m in t.getmembers():
                    if m.name.endswith(".jpg"):
                        img = Image.open(t.extractfile(m))
                        assert img.format == "JPEG" and min(img.size) <= 64
                    assert not m.name.endswith(".png")


def test_originals_are_kept_byte_for_byte_without_resize(raw_with_corrupt, tmp_path):
    make_shards(str(raw_with_corrupt), str(tmp_path / "o"), max_count=500, progress=False)
    src = {p.name: p.read_bytes() for p in raw_with_corrupt.rglob("*.png") if not p.name.startswith("bad")}
    with tarfile.open(tmp_path / "o/shard-000000.tar") as t:
        for m in t.getmembers():
            if m.name.endswith(".json"):
                meta = json.loads(t.extractfile(m).read())
                png = t.extractfile(m.name.replace(".json", ".png")).read()
                assert png == src[meta["path"].split("/")[-1]]


@pytest.mark.slow
def test_dry_run_writes_nothing_and_inspect_reports_the_set(raw_with_corrupt, tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "tools/make_shards.py"), str(raw_with_corrupt), str(tmp_path / "d"),
                        "--labels-per-class", "2", "--max-count", "60", "--dry-run"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "would write 20 images in 1 shards" in r.stdout and not (tmp_path / "d").exists()
    make_shards(str(raw_with_corrupt), str(tmp_path / "d"), labels_per_class=2, max_count=60, progress=False)
    r = subprocess.run([sys.executable, str(ROOT / "tools/inspect_shards.py"), str(tmp_path / "d/unlabeled"),
                        "--verify", "--grid", str(tmp_path / "grid.png"), "--grid-count", "16"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "200 images in 4 shards" in r.stdout and "failed inputs: 3" in r.stdout  # 203 planned / 60
    assert "200 decoded, 0 bad samples, counts match index: True" in r.stdout
    assert (tmp_path / "grid.png").stat().st_size > 2000


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_lean_tar_reader_agrees_with_tarfile_and_refuses_damage(fmt):
    import io

    from distssl.data.tar import tar_members

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as t:
        for name, data in [("a/b.jpg", b"x" * 1000), ("d" * 90 + "/deep/long.json", b"{}"), ("s.cls", b"")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
        d = tarfile.TarInfo("dir")
        d.type = tarfile.DIRTYPE
        t.addfile(d)
    raw = buf.getvalue()
    with tarfile.open(fileobj=io.BytesIO(raw)) as t:
        ref = [(m.name, t.extractfile(m).read()) for m in t if m.isfile()]
    assert list(tar_members(io.BytesIO(raw))) == ref
    with pytest.raises(tarfile.ReadError):
        list(tar_members(io.BytesIO(raw[:1200])))  # cut inside a member
    damaged = bytearray(raw)
    damaged[0] ^= 0xFF
    with pytest.raises(tarfile.ReadError):
        list(tar_members(io.BytesIO(bytes(damaged))))


def test_weak_view_crop_equals_reflect_pad_then_crop():
    import random

    import numpy as np
    from PIL import Image

    from distssl.data.transforms import flip_and_crop_array

    arr = np.random.default_rng(0).integers(0, 256, (28, 28, 3), dtype=np.uint8)
    img = Image.fromarray(arr)
    for seed in range(50):
        got = flip_and_crop_array(img, random.Random(seed), True, 0.125)
        rng = random.Random(seed)  # the same draws, in the same order, done the plain way
        ref = arr[:, ::-1] if rng.random() < 0.5 else arr
        pad = round(0.125 * 28)
        x, y = rng.randint(0, 2 * pad), rng.randint(0, 2 * pad)
        padded = np.pad(ref, ((pad, pad), (pad, pad), (0, 0)), mode="reflect")
        assert np.array_equal(got, padded[y:y + 28, x:x + 28]), seed


def test_min_shards_cuts_a_small_labeled_set_into_one_shard_per_reader(tiny_data, tmp_path):
    """--min-shards: 20 labeled images in 8 shards (so 8 readers each get their own), the big set as
    max_count would cut it; a rerun with the same option is the same build."""
    idx = make_shards(str(tiny_data["raw"] / "train"), str(tmp_path / "s"), labels_per_class=2, max_count=100,
                      min_shards=8, progress=False)
    labeled, unlabeled = idx["labeled"], idx["unlabeled"]
    assert len(labeled["shards"]) == 8 and labeled["count"] == 20
    assert max(s["count"] for s in labeled["shards"]) == 3
    assert len(unlabeled["shards"]) == 8 and unlabeled["count"] == 600  # 600 / 8 -> 75 per shard, under 100
    again = make_shards(str(tiny_data["raw"] / "train"), str(tmp_path / "s"), labels_per_class=2, max_count=100,
                        min_shards=8, progress=False)
    assert again["labeled"]["shards"] == labeled["shards"]
    with pytest.raises(ValueError, match="min_shards: 8 -> None"):
        make_shards(str(tiny_data["raw"] / "train"), str(tmp_path / "s"), labels_per_class=2, max_count=100,
                    progress=False)


def test_shards_are_webdatasets_webdataset_reads_unchanged(tiny_data):
    """Written by webdataset's TarWriter: webdataset's own pipeline reads every sample (image, label,
    json), and its tar stage gives the same members as distssl's reader."""
    import io
    import json as _json

    import webdataset as wds

    from distssl.data.tar import tar_members, webdataset_members

    shard = sorted(Path(tiny_data["labeled"]).glob("shard-*.tar"))[0]
    samples = list(wds.WebDataset(str(shard), shardshuffle=False))
    stats = _json.loads(shard.with_name(shard.name.replace(".tar", ".stats.json")).read_text())
    assert [s["__key__"] for s in samples] == [k for k, _ in stats["samples"]]
    for s in samples:
        assert set(s) >= {"__key__", "png", "cls", "json"}
        assert int(s["cls"]) == _json.loads(s["json"])["label"]
    data = shard.read_bytes()
    assert list(webdataset_members(io.BytesIO(data))) == list(tar_members(io.BytesIO(data)))


def test_an_eval_fraction_that_holds_out_nothing_is_refused_before_writing(tmp_path):
    """About 3 images per class at --eval-fraction 0.02: round(0.02 x size) = 0 in every class. Found by a GPU check's
    set-up, where numpy's split of an empty eval set raised 'number sections must be larger than 0'."""
    export_digits(tmp_path / "raw", n_train=30, n_eval=0)
    with pytest.raises(OptionError, match=r"^eval_fraction 0.02 holds out no image.*largest has \d+"):  # its terms
        make_shards(str(tmp_path / "raw/train"), str(tmp_path / "out"), labels_per_class=1, eval_fraction=0.02,
                    min_shards=4, progress=False)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.tar"))
    # the command names the flag the user gave, in one line, exit 2
    code = shards_cli.main([str(tmp_path / "raw/train"), str(tmp_path / "out"), "--labels-per-class", "1",
                            "--eval-fraction", "0.02", "--quiet"])
    assert code == 2


@pytest.mark.parametrize("flags,options,said", [
    (["--max-count", "0"], {"max_count": 0}, "--max-count must be >= 1"),
    (["--labels-per-class", "2", "--label-fraction", "0.1"], {"labels_per_class": 2, "label_fraction": 0.1},
     "give --labels-per-class or --label-fraction, not both"),
    (["--unlabeled", "--eval-fraction", "0.1"], {"unlabeled": True, "eval_fraction": 0.1},
     "cannot be combined with --unlabeled"),
    (["--max-size", "4"], {"image": ImageOptions(max_size=4)}, "--max-size must be >= 8 pixels"),
])
def test_the_builder_checks_its_options_in_its_terms_and_the_command_names_the_flags(tmp_path, capsys, flags,
                                                                                     options, said):
    export_digits(tmp_path / "raw", n_train=20, n_eval=0)
    assert shards_cli.main([str(tmp_path / "raw/train"), str(tmp_path / "out"), "--quiet", *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and said in err[0] and err[0].startswith("make_shards: error:"), err
    with pytest.raises(OptionError) as e:  # the library says the same of its own fields, no flag in sight
        BuildOptions(**options).check()
    assert set(e.value.options) <= set(options) | {"max_size"} and "--" not in str(e.value)
    assert not (tmp_path / "out").exists()
