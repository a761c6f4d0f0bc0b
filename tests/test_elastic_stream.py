"""A stream position saved by G readers, continued by G' readers: within the interrupted epoch no
sample is read twice and none is skipped (MosaicML Streaming's elastic determinism)."""
from collections import Counter

import pytest

from distssl.data.index import ShardSet, resolve
from distssl.data.streams import StreamPlan, TrainStream


def _key(raw, rng):
    return {"k": int(raw.key.rsplit("/", 1)[-1])}


def _stream(shards, rank, world, plan=None, cursors=None):
    return TrainStream(shards, rank=rank, world_size=world, batch_size=1, seed=5, shuffle_buffer=16,
                       make_item=_key, interleave_shards=4, plan=plan, cursors=cursors)


def _read(stream, n):
    """(keys read, cursor after them) for the first ``n`` samples."""
    keys, cursor = [], 0
    if n == 0:
        return keys, cursor
    for b in stream:
        keys.append(int(b["k"]))
        cursor = int(b["cursor"])
        if len(keys) == n:
            return keys, cursor


def _continue(shards, old_reads: dict[int, int], old_world: int, new_world: int):
    """Old readers read ``old_reads[g]`` samples; the new ones then read all of the plan's remainder."""
    consumed, cursors = Counter(), {}
    for g, n in old_reads.items():
        keys, cursors[g] = _read(_stream(shards, g, old_world), n)
        consumed.update(keys)
    plan = _stream(shards, 0, old_world).replan(cursors, old_world)
    rest = Counter()
    for g in range(new_world):
        mine = sum(shards.counts[u.shard] - len(u.skip) for u in plan.remainder[g::new_world])
        rest.update(_read(_stream(shards, g, new_world, plan=plan), mine)[0])
    return consumed, rest, plan


@pytest.mark.parametrize("old_world,new_world", [(2, 3), (2, 1), (1, 2), (3, 2)])
def test_the_interrupted_epoch_is_finished_exactly_once_by_any_number_of_readers(tiny_data, old_world, new_world):
    shards = resolve(tiny_data["unlabeled"])  # 600 samples in 12 shards of 50
    reads = {g: 37 + 29 * g for g in range(old_world)}  # readers at different places, mid-group
    consumed, rest, plan = _continue(shards, reads, old_world, new_world)
    assert consumed + rest == Counter({k: 1 for k in range(600)})  # each sample once: none twice, none skipped
    assert plan.next_epoch == 1


def test_readers_in_different_epochs_leave_both_epochs_exact(tiny_data):
    shards = resolve(tiny_data["unlabeled"])
    # reader 0 is 20 samples into epoch 1 (its part of an epoch is 300), reader 1 still in epoch 0
    consumed, rest, plan = _continue(shards, {0: 320, 1: 100}, 2, 3)
    assert consumed + rest == Counter({k: 2 for k in range(600)})  # epochs 0 and 1, each sample once in each
    assert plan.next_epoch == 2


def test_a_replanned_stream_resumes_exactly_and_a_plan_survives_json(tiny_data):
    shards = resolve(tiny_data["unlabeled"])
    _, c0 = _read(_stream(shards, 0, 2), 45)
    _, c1 = _read(_stream(shards, 1, 2), 80)
    plan = _stream(shards, 0, 2).replan({0: c0, 1: c1}, 2)
    plan = StreamPlan.from_json(plan.to_json())
    full, _ = _read(_stream(shards, 1, 3, plan=plan), 500)  # through the remainder and into epoch 1
    _, cursor = _read(_stream(shards, 1, 3, plan=plan), 333)
    resumed, _ = _read(_stream(shards, 1, 3, plan=plan, cursors={1: cursor}), 167)
    assert resumed == full[333:]


def test_a_brace_pattern_without_counts_cannot_change_its_reader_count(tiny_data):
    shards = resolve(tiny_data["unlabeled"])
    pattern = ShardSet(spec="pattern", urls=shards.urls)
    with pytest.raises(ValueError, match="same ranks x train.num_workers"):
        _stream(pattern, 0, 2).replan({0: 10, 1: 10}, 2)
