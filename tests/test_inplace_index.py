"""distssl-shards index: shards another tool wrote are indexed where they lie, without a byte rewritten,
in every tar dialect users meet, and then read as a shard set (counts, URLs, dense per-sample ids)."""
import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from conftest import export_digits, run_train, tiny_overrides
from distssl.cli.shards import main as shards_main
from distssl.data.index import read_index, resolve
from distssl.data.streams import tar_samples
from distssl.data.tar import tar_members
from distssl.shards.inplace import index_shards, read_class_names, scan_shard, shard_urls


def _image(fmt: str, size: int = 28, seed: int = 0) -> bytes:
    import numpy as np

    pixels = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def _tar(path: Path, members: list[tuple[str, bytes]], fmt=tarfile.USTAR_FORMAT) -> None:
    with tarfile.open(path, "w", format=fmt) as t:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))


def _img2dataset_shard(path: Path, shard: int, n: int) -> None:
    """img2dataset's layout: {shard}{i:04d}.jpg + .json + .txt, no cls."""
    members = []
    for i in range(n):
        key = f"{shard:05d}{i:04d}"
        members += [(f"{key}.jpg", _image("JPEG", seed=shard * 100 + i)), (f"{key}.txt", b"a caption"),
                    (f"{key}.json", json.dumps({"key": key, "status": "success"}).encode())]
    _tar(path, members)


def _sha(paths) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}


def test_img2dataset_shards_are_indexed_in_place_and_read_as_a_shard_set(tmp_path):
    src = tmp_path / "laion"
    src.mkdir()
    for s, n in enumerate((7, 5, 9)):
        _img2dataset_shard(src / f"{s:05d}.tar", s, n)
    before = _sha(src.iterdir())
    out = tmp_path / "index"
    index = index_shards(str(src / "{00000..00002}.tar"), str(out), progress=False)
    assert _sha(src.iterdir()) == before and sorted(p.name for p in src.iterdir()) == sorted(before)
    assert index["count"] == 21 and [s["count"] for s in index["shards"]] == [7, 5, 9]
    assert index["labeled"] is False and index["class_histogram"] == [] and index["members"] == {
        "jpg": 21, "json": 21, "txt": 21}
    assert [s["bytes"] for s in index["shards"]] == [(src / f"{s:05d}.tar").stat().st_size for s in range(3)]
    assert read_index(str(out)) == index  # written where --out said, apart from the shards

    shards = resolve(str(out))
    assert shards.urls == [str(src / f"{s:05d}.tar") for s in range(3)] and shards.counts == [7, 5, 9]
    # the keys are img2dataset's (000010004: not dense), the ids are positions: every sample one id in [0, 21)
    ids = shards.sample_ids()
    seen = [ids.of(raw.key, 0, s, i) for s in range(3) for i, raw in enumerate(tar_samples(shards.urls[s]))]
    assert sorted(seen) == list(range(21))
    # a folder holding them, and a list file, name the same shards
    assert shard_urls(str(src)) == shards.urls
    (tmp_path / "shards.txt").write_text("# the set\n" + "".join(f"laion/{s:05d}.tar\n" for s in range(3)))
    assert shard_urls(str(tmp_path / "shards.txt")) == shards.urls


def test_every_tar_dialect_and_image_member_counts_as_the_stream_reads_it(tmp_path):
    long_dir = "class_folder_with_a_rather_long_name/" * 4  # > 100 bytes: needs a GNU or a PAX long name
    jpeg, png, webp = _image("JPEG"), _image("PNG"), _image("WEBP")
    members = [(f"{long_dir}n01440764_10026.jpeg", jpeg), (f"{long_dir}n01440764_10026.cls", b"0"),
               ("train/n01443537_1.png", png), ("train/n01443537_1.cls", b"1"),
               ("train/n01443537_2.webp", webp), ("train/n01443537_2.cls", b"1"),
               ("plain.jpg", jpeg), ("plain.cls", b"2")]
    for fmt, name in ((tarfile.GNU_FORMAT, "gnu.tar"), (tarfile.PAX_FORMAT, "pax.tar")):
        _tar(tmp_path / name, members, fmt)
    (tmp_path / "names.json").write_text(json.dumps({"0": "tench", "1": "goldfish", "2": "shark"}))
    index = index_shards(str(tmp_path / "{gnu,pax}.tar"), str(tmp_path / "ix"),
                         class_names=read_class_names(str(tmp_path / "names.json")), progress=False)
    for shard in index["shards"]:  # the stream's own grouping of the same bytes gives the same count
        assert shard["count"] == sum(1 for _ in tar_samples(shard["url"])) == 4
    keys = [raw.key for raw in tar_samples(str(tmp_path / "pax.tar"))]
    assert keys[0] == f"{long_dir}n01440764_10026" and keys[1] == "train/n01443537_1"
    assert index["labeled"] is True and index["class_names"] == ["tench", "goldfish", "shark"]
    assert index["class_histogram"] == [2, 4, 2] and index["images"] == 8
    assert index["members"] == {"cls": 8, "jpeg": 2, "jpg": 2, "png": 2, "webp": 2}
    with pytest.raises(ValueError, match="cls 2 but --class-names lists 2"):
        index_shards(str(tmp_path / "gnu.tar"), str(tmp_path / "ix2"), class_names=["a", "b"], progress=False)


def test_headers_only_the_images_are_seeked_over_not_read(tmp_path):
    big = [(f"{i:04d}.png", _image("PNG", size=256, seed=i)) for i in range(6)]
    _tar(tmp_path / "big.tar", big + [("0000.cls", b"3")])

    class Counting(io.FileIO):
        read_bytes = 0

        def read(self, n=-1):
            data = super().read(n)
            Counting.read_bytes += len(data)
            return data

    with Counting(tmp_path / "big.tar") as f:
        names = [(name, data) for name, data in tar_members(f, keep=lambda n: n.endswith(".cls"))]
    size = (tmp_path / "big.tar").stat().st_size
    assert [n for n, _ in names] == [n for n, _ in big] + ["0000.cls"] and names[-1][1] == b"3"
    assert all(data is None for _, data in names[:-1])
    assert Counting.read_bytes < 0.02 * size  # headers and the cls: 512 B a member, of ~1.2 MB


def test_a_cut_or_damaged_shard_is_left_out_and_listed(tmp_path):
    for s in range(3):
        _img2dataset_shard(tmp_path / f"{s}.tar", s, 4)
    whole = (tmp_path / "1.tar").read_bytes()
    (tmp_path / "1.tar").write_bytes(whole[: len(whole) // 2 + 700])  # cut inside a member seeked over
    damaged = bytearray((tmp_path / "2.tar").read_bytes())
    with tarfile.open(tmp_path / "2.tar") as t:
        third = t.getmembers()[2].offset
    damaged[third + 148] ^= 0xFF  # the third member header's checksum
    (tmp_path / "2.tar").write_bytes(bytes(damaged))
    assert "truncated" in scan_shard(str(tmp_path / "1.tar"))["error"]
    index = index_shards(str(tmp_path / "{0..2}.tar"), str(tmp_path / "ix"), progress=False)
    assert [s["name"] for s in index["shards"]] == ["0.tar"] and index["count"] == 4
    assert index["num_failures"] == 2 and {f["reason"].split(":")[0] for f in index["failures"]} == {"ReadError"}


def test_the_command_reports_and_refuses_clearly(tmp_path, capsys):
    _img2dataset_shard(tmp_path / "00000.tar", 0, 3)
    assert shards_main(["index", str(tmp_path / "{00000..00001}.tar"), "--out", str(tmp_path / "ix"),
                        "--workers", "1"]) == 2
    assert "1 of 2 shards" in capsys.readouterr().err
    assert shards_main(["index", str(tmp_path / "empty"), "--out", str(tmp_path / "ix")]) == 2
    assert shards_main(["index", str(tmp_path), "--out", str(tmp_path / "ix"), "--workers", "1", "--quiet"]) == 0
    assert "3 samples in 1 shards" in capsys.readouterr().out


@pytest.mark.slow
def test_a_run_trains_on_indexed_foreign_shards_and_resumes_with_per_sample_state(tmp_path, tiny_data):
    """Temporal Ensembling's per-sample ensemble over foreign keys: the positions are its rows."""
    export_digits(tmp_path / "raw", n_train=120, n_eval=0)
    files = sorted((tmp_path / "raw/train").rglob("*.png"))
    for s in range(3):
        members = []
        for i, p in enumerate(files[s::3]):
            key = f"sample_{s}_{i:03d}"  # not a number: our key numbers cannot be its ids
            members += [(f"{key}.png", p.read_bytes()), (f"{key}.json", b"{}")]
        _tar(tmp_path / f"{s:05d}.tar", members)
    index_shards(str(tmp_path / "{00000..00002}.tar"), str(tmp_path / "ix"), progress=False)
    out = tmp_path / "run"
    args = tiny_overrides(tiny_data, out, **{"data.unlabeled": str(tmp_path / "ix"), "train.steps": 4,
                                             "train.ckpt_every": 2, "train.eval_every": 4,
                                             "ssl.algorithm": "temporal_ensembling"})
    r = run_train(args)
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_train(args + ["train.steps=6"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed" in r.stdout + r.stderr
    from distssl.checkpoint import layout as ckpt

    _, tag, _ = ckpt.latest(out / "checkpoints")
    state = ckpt.load_rank_state(ckpt.rank_state_path(out / "checkpoints", tag, 0))["algorithm"]
    # 6 steps x 8 unlabeled = 48 of the 120 samples, each its own row (one epoch: no sample twice)
    assert state["count"].numel() == 120 and int(state["count"].sum()) == 48
    assert int((state["count"] > 0).sum()) == 48
