"""Loader workers hand batches over through reused shared-memory slots (distssl.data.ring)."""
import threading
import time

import pytest
import torch
from torch.utils.data import DataLoader

from distssl.data.index import resolve
from distssl.data.ring import RingReader, RingWriter
from distssl.data.samples import eval_item, unlabeled_item
from distssl.data.streams import EvalStream, RingLoader, TrainStream, loader
from distssl.data.transforms import Views

VIEWS = Views(image_size=28, flip=True, pad_fraction=0.125, randaugment_ops=2, cutout_fraction=0.5)


def _standard(dataset, workers):
    return DataLoader(dataset, batch_size=None, num_workers=workers, prefetch_factor=2)


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


def test_ring_loader_gives_the_batches_of_the_standard_loader(tiny_data):
    """Same stream, same two workers: every tensor and counter identical, in the same order, while
    the consumer keeps every batch and is slower than the workers (slots are reused many times)."""
    def stream():
        return TrainStream(resolve(tiny_data["unlabeled"]), rank=0, world_size=1, batch_size=9, seed=5,
                           shuffle_buffer=16, make_item=unlabeled_item(VIEWS))

    ring = loader(stream(), 2, prefetch_factor=2)
    assert isinstance(ring, RingLoader)
    got, it = [], iter(ring)
    for _ in range(30):  # 15 per worker, 4 slots each
        got.append(next(it))
        time.sleep(0.01)
    want = [b for b, _ in zip(_standard(stream(), 2), range(30))]
    for a, b in zip(got, want):
        _same(a, b)
    assert got[0]["weak"].shape == (9, 3, 28, 28) and got[0]["weak"].dtype == torch.uint8
    assert got[0]["y_true"].dtype == torch.int64


def test_ring_loader_eval_sees_every_image_once_with_a_short_last_batch(tiny_data):
    def stream():
        return EvalStream(resolve(tiny_data["eval"]), rank=0, world_size=1, batch_size=10,
                          make_item=eval_item(VIEWS))

    got = list(loader(stream(), 2))
    want = list(_standard(stream(), 2))
    assert len(got) == len(want)
    for a, b in zip(got, want):
        _same(a, b)
    assert sum(b["y"].numel() for b in got) == 97


def test_a_writer_reuses_a_slot_only_after_the_reader_copied_it_out():
    """Flow control that does not trust the DataLoader's prefetch accounting: with 2 slots, the
    third batch waits until the first has been unpacked."""
    writer, reader = RingWriter(slots=2), RingReader()

    def items(v):
        return [{"x": torch.full((2, 3), v, dtype=torch.int32), "y": v} for _ in range(4)]

    m0, m1 = writer.collate(items(0)), writer.collate(items(1))
    third = {}
    t = threading.Thread(target=lambda: third.update(msg=writer.collate(items(2))))
    t.start()
    time.sleep(0.2)
    assert t.is_alive() and not third  # both slots hold batches nobody has copied out
    slot0 = m0["__ring__"]["slot"]
    b0 = reader.unpack(m0)
    t.join(timeout=5)
    assert not t.is_alive()
    assert third["msg"]["__ring__"]["slot"] == slot0 == 0
    b1, b2 = reader.unpack(m1), reader.unpack(third["msg"])
    assert b0["x"].unique().tolist() == [0] and b1["x"].unique().tolist() == [1] and b2["x"].unique().tolist() == [2]
    assert b0["y"].tolist() == [0] * 4 and b0["x"].shape == (4, 2, 3)


def test_a_larger_batch_gets_larger_slots():
    writer, reader = RingWriter(slots=2), RingReader()
    small = reader.unpack(writer.collate([{"x": torch.ones(4)}] * 2))
    big = reader.unpack(writer.collate([{"x": torch.arange(100.0)}] * 3))
    assert small["x"].shape == (2, 4) and big["x"].shape == (3, 100) and big["x"][2, 99] == 99
    assert len(reader.rings) == 1  # the old slots are let go


@pytest.mark.parametrize("workers", [0])
def test_without_workers_there_is_no_ring(tiny_data, workers):
    ds = TrainStream(resolve(tiny_data["unlabeled"]), rank=0, world_size=1, batch_size=4, seed=0,
                     shuffle_buffer=4, make_item=unlabeled_item(VIEWS))
    b = next(iter(loader(ds, workers)))
    assert "__ring__" not in b and b["weak"].shape == (4, 3, 28, 28)
