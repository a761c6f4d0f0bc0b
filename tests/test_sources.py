"""Several shard sets in one stream, each with an optional weight: config forms, sampling shares,
exact resume, world-size invariance, per-set class order, and a real run over two unlabeled sets."""
import json
import shutil
from collections import Counter

import pytest
import torch

from conftest import run_train, tiny_overrides
from distssl.config import ConfigError, data_sources, load_config
from distssl.data.index import resolve
from distssl.data.streams import TrainStream
from distssl.shards import make_shards

DEMO = "configs/demo.yaml"


@pytest.fixture(scope="module")
def second_set(tiny_data, tmp_path_factory):
    """The 97 eval digits as a second unlabeled set of 5 shards (20 per shard)."""
    dst = tmp_path_factory.mktemp("second") / "unlabeled"
    make_shards(str(tiny_data["raw"] / "eval"), str(dst), max_count=20, unlabeled=True, progress=False)
    return str(dst)


@pytest.mark.parametrize("value,expected", [
    ("s3://a/u", [("s3://a/u", None)]),
    ("[s3://a/u, s3://b/u]", [("s3://a/u", None), ("s3://b/u", None)]),
    ("{s3://a/u: 3, s3://b/u: 1}", [("s3://a/u", 3.0), ("s3://b/u", 1.0)]),
    ("[{path: s3://a/u, weight: 0.5}, {path: s3://b/u, weight: 2}]", [("s3://a/u", 0.5), ("s3://b/u", 2.0)]),
])
def test_data_spec_forms_from_the_command_line(value, expected):
    cfg = load_config(DEMO, [f"data.unlabeled={value}"])
    assert data_sources(cfg.data.unlabeled) == expected


@pytest.mark.parametrize("value,needle", [
    ("{s3://a/u: 3, s3://b/u: 0}", "weight must be a number > 0"),
    ("[{path: s3://a/u, weight: 2}, s3://b/u]", "give every set a weight, or none"),
    ("[s3://a/u, s3://a/u]", "listed twice"),
    ("[{path: s3://a/u, wieght: 2}]", "expected a path or {path: ..., weight: ...}"),
    ("[]", "expected a shard set"),
])
def test_data_spec_mistakes_name_the_key_and_the_fix(value, needle):
    with pytest.raises(ConfigError, match="data.unlabeled") as e:
        load_config(DEMO, [f"data.unlabeled={value}"])
    assert needle in str(e.value)


def _source_key(raw, rng):
    return {"src": raw.source, "k": int(raw.key.rsplit("/", 1)[-1])}


def _samples(shards, rank, world, n_batches, batch=10, cursors=None, seed=0):
    stream = TrainStream(shards, rank=rank, world_size=world, batch_size=batch, seed=seed, shuffle_buffer=16,
                         make_item=_source_key, interleave_shards=4, cursors=cursors)
    out = []
    for b in stream:
        out.append(b)
        if len(out) == n_batches:
            return out


def _one_epoch(shards, world):
    """Every reader's part of epoch 0, sample by sample: (source, key) -> times read."""
    got = Counter()
    for rank in range(world):
        n = sum(shards.counts[s] for s in shards.epoch_shards(0, 0)[rank::world])
        stream = TrainStream(shards, rank=rank, world_size=world, batch_size=1, seed=0, shuffle_buffer=16,
                             make_item=_source_key, interleave_shards=4)
        for i, b in enumerate(stream):
            if i == n:
                break
            got[(int(b["src"]), int(b["k"]))] += 1
    return got


def test_unweighted_sets_give_every_sample_of_each_once_per_epoch(tiny_data, second_set):
    both = resolve([tiny_data["unlabeled"], second_set])  # 600 + 97 samples, 12 + 5 shards
    assert both.total == 697 and len(both.urls) == 17
    got = _one_epoch(both, 3)
    assert set(got.values()) == {1} and len(got) == 697
    assert sum(src == 1 for src, _ in got) == 97


def test_weights_set_each_sources_share_and_every_shard_of_a_source_is_read_equally(tiny_data, second_set):
    # the small set (97 samples) weighted 1:1 against the big one (600): half the samples from each
    mixed = resolve({tiny_data["unlabeled"]: 1, second_set: 1})
    per_epoch = mixed.shards_per_epoch()
    assert per_epoch[0] == 7 and per_epoch[1] == 18  # ~350 samples each of an epoch of 697
    epochs = [mixed.epoch_shards(0, e) for e in range(10)]
    assert all(len(e) == sum(per_epoch) for e in epochs)
    reads = Counter(int(s) for e in epochs for s in e)
    small = [reads[s] for s in range(12, 17)]
    assert max(small) - min(small) <= 1  # 36 reads of each of the 5 small shards over 10 epochs
    big = [reads[s] for s in range(12)]
    assert max(big) - min(big) <= 1
    samples = [x for b in _samples(mixed, 0, 1, 140) for x in b["src"].tolist()]  # two epochs
    share = samples.count(1) / len(samples)
    assert 0.45 < share < 0.6, share
    assert mixed.epoch_shards(0, 3).tolist() == resolve({tiny_data["unlabeled"]: 1, second_set: 1}) \
        .epoch_shards(0, 3).tolist()  # a pure function of (seed, epoch)


def test_weighted_stream_resumes_exactly_and_epochs_do_not_depend_on_the_world_size(tiny_data, second_set):
    mixed = resolve({tiny_data["unlabeled"]: 3, second_set: 1})
    full = _samples(mixed, 1, 2, 30, batch=7)
    cursor = full[17]["cursor"]
    resumed = _samples(mixed, 1, 2, 12, batch=7, cursors={1: cursor})
    for a, b in zip(full[18:], resumed):
        assert torch.equal(a["src"], b["src"]) and torch.equal(a["k"], b["k"])
    # one epoch's samples are the same multiset whether 1 or 3 readers take them
    one, three = _one_epoch(mixed, 1), _one_epoch(mixed, 3)
    assert one == three and sum(one.values()) == sum(mixed.counts[s] for s in mixed.epoch_shards(0, 0))


def test_sets_that_order_their_classes_differently_are_mapped_per_set(tiny_data, tmp_path):
    permuted = tmp_path / "labeled2"
    shutil.copytree(tiny_data["labeled"], permuted)
    index = json.loads((permuted / "index.json").read_text())
    index["class_names"] = index["class_names"][::-1]
    (permuted / "index.json").write_text(json.dumps(index))
    from distssl.train.preflight import check_classes
    base = [f"data.labeled=[{tiny_data['labeled']}, {permuted}]", f"data.unlabeled={tiny_data['unlabeled']}",
            f"data.eval={tiny_data['eval']}", "data.demo_root=null"]
    with pytest.raises(ConfigError, match=r"data.labeled\[1\] has classes"):
        check_classes(load_config(DEMO, base))
    maps = check_classes(load_config(DEMO, base + ["data.class_match=by_name"]))
    assert maps == {"labeled": {1: list(range(9, -1, -1))}}


def test_a_set_of_some_of_the_classes_joins_by_name(tiny_data, tmp_path):
    """A few new labels (distssl-predict --select, labelled) name only the classes they hold: by name they map
    into the labeled set's order; strict, they are refused for their class count."""
    few = tmp_path / "few"
    shutil.copytree(tiny_data["labeled"], few)
    index = json.loads((few / "index.json").read_text())
    index.update(class_names=["7", "2", "9"], num_classes=3)
    (few / "index.json").write_text(json.dumps(index))
    from distssl.train.preflight import check_classes
    base = [f"data.labeled=[{tiny_data['labeled']}, {few}]", f"data.unlabeled={tiny_data['unlabeled']}",
            f"data.eval={tiny_data['eval']}", "data.demo_root=null"]
    with pytest.raises(ConfigError, match=r"model.num_classes=10 but data.labeled\[1\] has 3 classes"):
        check_classes(load_config(DEMO, base))
    assert check_classes(load_config(DEMO, base + ["data.class_match=by_name"])) == {"labeled": {1: [7, 2, 9]}}
    index["class_names"] = ["7", "2", "cat"]
    (few / "index.json").write_text(json.dumps(index))
    with pytest.raises(ConfigError, match=r"only in data.labeled\[1\]: \[cat\]"):
        check_classes(load_config(DEMO, base + ["data.class_match=by_name"]))


@pytest.mark.slow
def test_a_run_reads_two_weighted_unlabeled_sets_and_resumes(tiny_data, second_set, tmp_path):
    out = tmp_path / "run"
    spec = f"{{{tiny_data['unlabeled']}: 2, {second_set}: 1}}"
    args = tiny_overrides(tiny_data, out, **{"train.steps": 4, "train.eval_every": 4, "train.ckpt_every": 2})
    args = [a for a in args if not a.startswith("data.unlabeled=")] + [f"data.unlabeled={spec}"]
    r = run_train(args)
    assert r.returncode == 0, r.stderr[-2000:]
    saved = (out / "config.yaml").read_text()
    assert "weight: 2.0" in saved and second_set in saved
    r = run_train(args[:-1] + [f"data.unlabeled={{{tiny_data['unlabeled']}: 1, {second_set}: 1}}",
                               "train.steps=6"])
    assert r.returncode != 0 and "data.unlabeled" in (r.stderr + r.stdout)  # other weights: not the same run
