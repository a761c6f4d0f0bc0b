"""Corrupt data at train time: skipped, counted, warned once per shard; too much of it stops the run."""
import io
import json
import tarfile

import pytest

from conftest import run_train, tiny_overrides
from distssl.data.index import resolve
from distssl.data.samples import labeled_item
from distssl.data.streams import TrainStream
from distssl.data.transforms import Views

VIEWS = Views(image_size=28, flip=False, pad_fraction=0.125, randaugment_ops=2, cutout_fraction=0.5)


def _add(tar, name, payload):
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


@pytest.fixture
def damaged_labeled(tiny_data, tmp_path):
    """The tiny labeled set (20 digits) rewritten with 2 undecodable images and 1 sample without cls."""
    src = resolve(tiny_data["labeled"])
    dst = tmp_path / "labeled"
    dst.mkdir()
    with tarfile.open(src.urls[0]) as t_in, tarfile.open(dst / "shard-000000.tar", "w") as t_out:
        members = t_in.getmembers()
        for i, m in enumerate(members):
            data = t_in.extractfile(m).read()
            key, ext = m.name.split(".", 1)
            if ext == "png" and key in {members[0].name.split(".")[0], members[3].name.split(".")[0]}:
                data = data[:40]  # truncated image
            if ext == "cls" and key == members[6].name.split(".")[0]:
                continue  # a sample missing its label
            _add(t_out, m.name, data)
    index = json.loads((tiny_data["root"] / "shards/train/labeled/index.json").read_text())
    (dst / "index.json").write_text(json.dumps(index))
    return dst


def test_bad_samples_are_skipped_counted_and_warned_once_per_shard(damaged_labeled, caplog):
    stream = TrainStream(resolve(str(damaged_labeled)), rank=0, world_size=1, batch_size=17, seed=0,
                         shuffle_buffer=4, make_item=labeled_item(VIEWS))
    batch = next(iter(stream))  # one epoch of the 20 samples: 17 good
    assert batch["x"].shape[0] == 17 and batch["skipped"] == 3 and batch["cursor"] == 20
    assert caplog.text.count("skipping sample") == 1


@pytest.mark.slow
def test_too_many_bad_samples_stop_the_run_with_a_clear_error(tiny_data, damaged_labeled, tmp_path):
    data = {**tiny_data, "labeled": str(damaged_labeled)}
    r = run_train(tiny_overrides(data, tmp_path / "run", **{"train.steps": 400, "train.eval_every": 0,
                                                           "train.ckpt_every": 0, "train.max_bad_fraction": 0.01}))
    assert r.returncode == 3, r.stderr[-2000:]
    assert "data error" in r.stderr and "train.max_bad_fraction" in r.stderr and "Traceback" not in r.stderr


class _Payload:
    def __reduce__(self):
        import os
        return (os.system, (f"touch {_Payload.target}",))


def test_a_pickle_planted_in_a_shard_is_never_unpickled(tiny_data, tmp_path):
    import pickle
    _Payload.target = tmp_path / "pwned"
    src = resolve(tiny_data["labeled"])
    dst = tmp_path / "labeled"
    dst.mkdir()
    with tarfile.open(src.urls[0]) as t_in, tarfile.open(dst / "shard-000000.tar", "w") as t_out:
        for m in t_in.getmembers():
            _add(t_out, m.name, t_in.extractfile(m).read())
            if m.name.endswith(".cls"):  # every sample also carries a pickle and a .pth payload
                key = m.name.split(".", 1)[0]
                _add(t_out, f"{key}.pickle", pickle.dumps(_Payload()))
                _add(t_out, f"{key}.pth", pickle.dumps(_Payload()))
    (dst / "index.json").write_text((tiny_data["root"] / "shards/train/labeled/index.json").read_text())
    stream = TrainStream(resolve(str(dst)), rank=0, world_size=1, batch_size=20, seed=0, shuffle_buffer=4,
                         make_item=labeled_item(VIEWS))
    batch = next(iter(stream))
    assert batch["x"].shape[0] == 20 and batch["skipped"] == 0 and set(batch) == {"x", "y", "worker", "cursor",
                                                                                "skipped"}
    assert not _Payload.target.exists()
