"""distssl-selftrain: round K's run is a pure function of the config; the rounds run from one command,
each a resumable run folder, and a rerun of finished rounds trains and rewrites nothing."""
import json
import subprocess

import pytest

from conftest import ROOT, tiny_overrides
from distssl.config import load_config
from distssl.data.spec import data_sources
from distssl.predict.selftrain import PSEUDO, round_config
from distssl.testing import deepspeed_command, launch_env


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
                                              "selftrain.min_confidence": 0.0})
    cmd = deepspeed_command(ROOT / "launch/selftrain.py", ["--rounds", "2", *args], nproc=2)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT, env=launch_env())
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    record = json.loads((root / "selftrain.json").read_text())["rounds"]
    assert [e["round"] for e in record] == [0, 1] and all(0 <= e["top1"] <= 1 for e in record)
    student = record[1]
    # every unlabeled image was predicted once by round 0, and at confidence >= 0 every one is a pseudo-label
    pred = json.loads((root / "round-1/teacher_predictions/summary.json").read_text())
    assert pred["predicted"] == 600 and student["pseudo_labeled"] == 600 and student["predicted"] == 600
    assert student["teacher"] == str(root / "round-0")
    index = json.loads((root / f"round-1/{PSEUDO}/index.json").read_text())
    assert index["labeled"] and index["count"] == 600 and sum(index["class_histogram"]) == 600
    cfg = json.loads(json.dumps(__import__("yaml").safe_load((root / "round-1/config.yaml").read_text())))
    assert cfg["ssl"]["lambda_u"] == 0 and cfg["data"]["labeled_view"] == "strong"
    assert (root / "round-1/model.safetensors").exists() and (root / "round-1/confusion.png").exists()
    # a rerun: both rounds finished, nothing trained again and no prediction or pseudo-label rewritten
    lines = {k: len((root / f"round-{k}/metrics.jsonl").read_text().splitlines()) for k in (0, 1)}
    kept = [f for d in ("teacher_predictions", PSEUDO) for f in (root / "round-1" / d).rglob("*") if f.is_file()]
    mtimes = {f: f.stat().st_mtime_ns for f in kept + [root / "selftrain.json"]}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT, env=launch_env())
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "already finished" in r.stdout + r.stderr
    assert {k: len((root / f"round-{k}/metrics.jsonl").read_text().splitlines()) for k in (0, 1)} == lines
    assert {f: f.stat().st_mtime_ns for f in mtimes} == mtimes
