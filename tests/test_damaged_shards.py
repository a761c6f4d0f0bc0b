"""Shards damaged past their first member: told apart from an outage, counted, never a spinning run."""
import json
import shutil
import time

import pytest

from conftest import run_train, tiny_overrides
from distssl.data.index import resolve
from distssl.data.samples import unlabeled_item
from distssl.data.streams import DataError, TrainStream, resilient_samples
from distssl.data.transforms import Views

VIEWS = Views(image_size=28, flip=False, pad_fraction=0.125, randaugment_ops=2, cutout_fraction=0.5)


def _damage(src: str, dst, at_member: int) -> None:
    """Copy a shard set, overwriting the tar header of member ``at_member`` of every shard with text
    (as a bad disk block or a botched copy would). Unlabeled samples are two members: png + json."""
    shutil.copytree(src, dst)
    for tar in sorted(dst.glob("*.tar")):
        data = bytearray(tar.read_bytes())
        offset, member = 0, 0
        while member < at_member:  # walk the headers: 512 + size rounded up to 512
            size = int(data[offset + 124: offset + 136].split(b"\0")[0].strip() or b"0", 8)
            offset += 512 + -(-size // 512) * 512
            member += 1
        data[offset: offset + 512] = (b"this block was overwritten " * 20)[:512]
        tar.write_bytes(bytes(data))


def test_a_header_overwritten_with_text_is_damage_not_an_outage(tiny_data, tmp_path):
    damaged = tmp_path / "unlabeled"
    _damage(tiny_data["unlabeled"], damaged, at_member=20)  # 10 samples (png + json) then the damage
    url = resolve(str(damaged)).urls[0]
    t = time.time()
    with pytest.raises(Exception) as e:
        n = 0
        for _ in resilient_samples(url):
            n += 1
    # the 9 samples before the damage (the 10th is lost with it: more of its members might have followed)
    assert n == 9 and time.time() - t < 1.0  # no back-off retries: damage is permanent
    assert "damaged" in str(e.value)


def test_a_damaged_shard_counts_its_unread_samples_as_skipped(tiny_data, tmp_path):
    damaged = tmp_path / "unlabeled"
    _damage(tiny_data["unlabeled"], damaged, at_member=40)  # 20 of each shard's 50 samples readable
    shards = resolve(str(damaged))
    stream = TrainStream(shards, rank=0, world_size=1, batch_size=12, seed=0, shuffle_buffer=8,
                         make_item=unlabeled_item(VIEWS), interleave_shards=4)
    batches = []
    for b in stream:
        batches.append(b)
        if len(batches) == 20:  # one epoch is 19 batches; a shard's failure is counted into the batch after
            break
    # 19 of each shard's 50 samples read (the 20th is lost with the damage), the other 31 counted
    assert sum(len(b["weak"]) for b in batches[:19]) == 12 * 19
    assert sum(int(b["skipped"]) for b in batches) == 12 * 31


def test_a_stream_with_nothing_readable_in_an_epoch_stops_naming_the_set(tiny_data, tmp_path):
    damaged = tmp_path / "unlabeled"
    _damage(tiny_data["unlabeled"], damaged, at_member=0)
    stream = TrainStream(resolve(str(damaged)), rank=0, world_size=1, batch_size=10, seed=0, shuffle_buffer=8,
                         make_item=unlabeled_item(VIEWS), name="unlabeled")
    with pytest.raises(DataError, match="data.unlabeled") as e:
        next(iter(stream))
    assert "a whole epoch" in str(e.value)


# damage mid-shard (the case that spun); damage at the first header stops the same way, shown at the
# stream level above (test_a_stream_with_nothing_readable_in_an_epoch_stops_naming_the_set)
@pytest.mark.slow
@pytest.mark.parametrize("at_member", [40])
def test_a_run_on_damaged_unlabeled_shards_stops_with_a_data_error_instead_of_spinning(tiny_data, tmp_path,
                                                                                       at_member):
    damaged = tmp_path / "unlabeled"
    _damage(tiny_data["unlabeled"], damaged, at_member=at_member)
    data = {**tiny_data, "unlabeled": str(damaged)}
    t = time.time()
    r = run_train(tiny_overrides(data, tmp_path / "run", **{"train.steps": 2000, "train.eval_every": 0,
                                                           "train.ckpt_every": 0, "train.num_workers": 1}),
                  timeout=300)
    assert r.returncode == 3, r.stderr[-2000:]
    assert "data error" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert ("data.unlabeled" in r.stderr) if at_member == 0 else ("train.max_bad_fraction" in r.stderr)
    assert time.time() - t < 240
    metrics = tmp_path / "run/metrics.jsonl"
    if at_member == 40 and metrics.exists():  # it trained on what it could read until the limit tripped
        steps = [json.loads(line).get("step", 0) for line in metrics.read_text().splitlines()]
        assert max(steps) < 2000
