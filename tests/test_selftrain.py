"""distssl-selftrain: round K's run is a pure function of the config; the rounds run from one command,
each a resumable run folder, and a rerun of finished rounds trains and rewrites nothing."""
import json
import subprocess

import numpy as np
import pytest
import torch

from conftest import ROOT, tiny_overrides
from distssl.config import load_config
from distssl.data.spec import data_sources
from distssl.selftrain.plan import PSEUDO, round_config
from support.servers import launch_env, ranks_command


def _base(tmp_path, *extra):
    data = {"labeled": "L", "unlabeled": "U", "eval": "E"}
    return load_config(None, tiny_overrides(data, tmp_path / "st") + list(extra))


def test_round_zero_is_the_configured_run_in_its_own_folder(tmp_path):
    base = _base(tmp_path)
    r0 = round_config(base, 0)
    assert r0.run.out_dir == str(tmp_path / "st/round-0")
    r0.run.out_dir = base.run.out_dir
    assert r0 == base


def test_a_student_learns_from_the_human_labels_and_the_teachers_pseudo_labels_with_noise(tmp_path):
    base = _base(tmp_path, "model.pretrained=w.safetensors")
    r2 = round_config(base, 2)
    assert r2.run.out_dir == str(tmp_path / "st/round-2")
    assert data_sources(r2.data.labeled) == [("L", None), (str(tmp_path / f"st/round-2/{PSEUDO}"), None)]
    assert r2.data.unlabeled == "U" and r2.data.eval == "E"
    assert r2.ssl.lambda_u == 0  # the paper's student: labels and pseudo-labels only
    assert (r2.model.drop_rate, r2.model.drop_path_rate, r2.data.labeled_view) == (0.5, 0.2, "strong")
    assert r2.model.name == base.model.name and r2.model.pretrained == "w.safetensors"
    assert base.ssl.lambda_u == 1.0 and base.data.labeled_view == "weak"  # the base is left as it was


def test_the_selftrain_keys_shape_the_student(tmp_path):
    base = _base(tmp_path, "model.pretrained=w.safetensors", "selftrain.student_model=resnet10t",
                 "selftrain.ssl=true", "selftrain.pseudo_weight=3", "selftrain.strong_view=false",
                 "selftrain.drop_rate=0", "data.labeled={A: 1, B: 3}")
    r1 = round_config(base, 1)
    pseudo = str(tmp_path / f"st/round-1/{PSEUDO}")
    assert data_sources(r1.data.labeled) == [("A", 0.25), ("B", 0.75), (pseudo, 3.0)]  # human weights sum to 1
    assert r1.ssl.lambda_u == 1.0 and r1.data.labeled_view == "weak" and r1.model.drop_rate == 0
    assert r1.model.name == "resnet10t" and r1.model.pretrained is None  # another architecture: not w's
    same = round_config(_base(tmp_path, "selftrain.init_from_teacher=true"), 1)
    assert same.model.pretrained == str(tmp_path / "st/round-0/model.safetensors")


def test_bad_selftrain_values_are_refused_by_name(tmp_path):
    from distssl.config import ConfigError

    for bad, key in (("selftrain.rounds=0", "selftrain.rounds"), ("selftrain.min_confidence=2", "min_confidence"),
                     ("selftrain.pseudo_weight=-1", "pseudo_weight"), ("selftrain.colour=1", "selftrain.colour")):
        with pytest.raises(ConfigError, match=key):
            _base(tmp_path, bad)


@pytest.mark.slow
@pytest.mark.distributed
def test_two_rounds_run_from_one_command_on_two_ranks_and_a_rerun_trains_nothing(tiny_data, tmp_path):
    """Two ranks: rank 1 must not predict with round 0's model before rank 0 has exported it."""
    root = tmp_path / "st"
    args = tiny_overrides(tiny_data, root, **{"train.steps": 12, "train.eval_every": 0, "train.ckpt_every": 6,
                                              "selftrain.min_confidence": 0.0, "selftrain.epochs": 0.2})
    cmd = ranks_command(ROOT / "launch/selftrain.py", ["--rounds", "2", *args], nproc=2)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT, env=launch_env())
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    saved = json.loads((root / "selftrain.json").read_text())
    record = saved["rounds"]
    assert [e["round"] for e in record] == [0, 1] and all(0 <= e["top1"] <= 1 for e in record)
    student = record[1]
    # every unlabeled image was predicted once by round 0; at confidence >= 0 the set is balanced to 600 / 10 a
    # class: each predicted class's 60 most confident, a class predicted less often duplicated up to 60
    pred = json.loads((root / "round-1/teacher_predictions/summary.json").read_text())
    classes = [int(c) for c in pred["class_histogram"]]  # the classes the 12-step teacher predicts at all
    assert pred["predicted"] == 600 and student["predicted"] == 600 and student["per_class"] == 60
    assert student["pseudo_labeled"] == 60 * len(classes) and student["teacher"] == str(root / "round-0")
    index = json.loads((root / f"round-1/{PSEUDO}/index.json").read_text())
    assert index["labeled"] and index["count"] == 60 * len(classes)
    assert index["class_histogram"] == [60 if c in classes else 0 for c in range(10)]
    # the student's length is selftrain.epochs passes over its labeled set: 0.2 x (its count + 20) / (4 x (1 + 2))
    assert student["steps"] == -(-0.2 * (index["count"] + 20) // 12) and student["batch_size"] == 12
    best = max(record, key=lambda e: (e["top1"], -e["round"]))
    assert saved["best_round"] == best["round"] and saved["best_top1"] == best["top1"]
    for name in ("model.safetensors", "model.json"):  # the command's model: the best round's export
        assert (root / name).read_bytes() == (root / f"round-{best['round']}" / name).read_bytes()
    cfg = json.loads(json.dumps(__import__("yaml").safe_load((root / "round-1/config.yaml").read_text())))
    assert cfg["ssl"]["lambda_u"] == 0 and cfg["data"]["labeled_view"] == "strong"
    assert (root / "round-1/model.safetensors").exists() and (root / "round-1/confusion.png").exists()
    # a rerun: both rounds finished, nothing trained again and no prediction or pseudo-label rewritten
    lines = {k: len((root / f"round-{k}/metrics.jsonl").read_text().splitlines()) for k in (0, 1)}
    kept = [f for d in ("teacher_predictions", PSEUDO) for f in (root / "round-1" / d).rglob("*") if f.is_file()]
    mtimes = {f: f.stat().st_mtime_ns for f in kept + [root / "selftrain.json", root / "model.safetensors"]}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT, env=launch_env())
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "already finished" in r.stdout + r.stderr
    assert {k: len((root / f"round-{k}/metrics.jsonl").read_text().splitlines()) for k in (0, 1)} == lines
    assert {f: f.stat().st_mtime_ns for f in mtimes} == mtimes


def test_the_selection_keeps_each_classes_most_confident_and_duplicates_a_rare_class_up_to_the_budget():
    from distssl.selftrain.plan import select

    pred = np.array([0, 0, 0, 0, 1, 1, 2, 0])
    conf = np.array([0.9, 0.5, 0.99, 0.2, 0.8, 0.7, 0.95, 0.6])
    copies = select(pred, conf, 3, min_confidence=0.3, per_class=3, seed=0)
    # class 0: 0.99, 0.9, 0.6 kept (0.5 is the fourth; 0.2 under min_confidence); class 1: both, one twice;
    # class 2: its one image three times
    assert copies.tolist()[:4] == [1, 0, 1, 0] and copies[7] == 1
    assert copies[4] + copies[5] == 3 and min(copies[4], copies[5]) >= 1 and copies[6] == 3
    assert select(pred, conf, 3, 0.3, 3, seed=0).tolist() == copies.tolist()  # a pure function of its seed
    assert select(pred, conf, 3, 0.3, per_class=0, seed=0).tolist() == [1, 1, 1, 0, 1, 1, 1, 1]  # unbalanced


def test_an_ensemble_is_the_mean_of_the_teachers_distributions_with_the_rest_of_each_spread_evenly():
    from distssl.data.targets import dense
    from distssl.selftrain.plan import ensemble

    a = dense([2, 0], [0.6, 0.3], 4)
    assert np.allclose(a, [0.3, 0.05, 0.6, 0.05])
    both = ensemble([[([2, 0], [0.6, 0.3])], [([1], [0.7])]], 4)
    assert np.allclose(both[0], (a + np.array([0.1, 0.7, 0.1, 0.1])) / 2)


def test_the_student_trains_epochs_over_its_set_in_a_teachers_step_of_images(tmp_path):
    from distssl.selftrain.plan import round_config, student_steps, teachers_of

    base = _base(tmp_path, "selftrain.epochs=3", "selftrain.targets=soft")
    r1 = round_config(base, 1, labeled_count=1000)
    assert r1.train.batch_size == 4 * (1 + 2) and r1.train.steps == student_steps(1000, 3, 12) == 250
    assert r1.data.labeled_targets == "soft" and base.data.labeled_targets == "hard"
    root = str(tmp_path / "st")
    assert teachers_of(base, 2, root) == [f"{root}/round-1"]
    many = _base(tmp_path, "selftrain.ensemble=all", "selftrain.teachers=[other/run]")
    assert teachers_of(many, 2, root) == [f"{root}/round-1", f"{root}/round-0", "other/run"]


def test_a_soft_label_becomes_the_target_distribution_and_a_human_label_its_one_hot():
    from distssl.data.samples import soft_target
    from distssl.data.streams import Raw

    soft = Raw("k", {"cls": b"2", "json": json.dumps({"soft": {"ids": [2, 0], "probs": [0.6, 0.3]}}).encode()},
               0, 0, 0)
    assert torch.allclose(soft_target(soft, 2, 4), torch.tensor([0.3, 0.05, 0.6, 0.05], dtype=torch.float32))
    human = Raw("h", {"cls": b"1"}, 0, 1, 0)
    assert soft_target(human, 1, 4).tolist() == [0.0, 1.0, 0.0, 0.0]


def test_a_student_below_its_teacher_is_said_and_the_best_round_stays_the_model():
    from distssl.selftrain.rounds import below_teacher, best_round

    rounds = [{"round": 0, "top1": 0.67}, {"round": 1, "top1": 0.342}, {"round": 2, "top1": 0.67}]
    assert "round 1: the student (34.20%) is below its teacher, round 0 (67.00%)" in below_teacher(rounds, 1)
    assert below_teacher(rounds, 2) is None and below_teacher(rounds, 0) is None
    assert best_round(rounds)["round"] == 0  # the earliest of equals: a student must beat it to replace it
