"""Mistakes a user makes are caught before training, each with one line that says what to do (exit 2)."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT, run_train, tiny_overrides
from distssl.config import ConfigError, load_config
from distssl.train.preflight import check_classes, looks_like_weights

DEMO = str(ROOT / "configs/demo.yaml")


def _refused(r: subprocess.CompletedProcess, *needles: str) -> str:
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    line = next(x for x in r.stderr.splitlines() if x.startswith("config error:"))
    for needle in needles:
        assert needle in line, line
    return line


@pytest.fixture(scope="module")
def renamed_eval(tiny_data, tmp_path_factory):
    """The tiny eval digits with class 0's folder renamed: same count, other names, every label shifted."""
    from distssl.shards import make_shards

    root = tmp_path_factory.mktemp("renamed")
    shutil.copytree(tiny_data["raw"] / "eval", root / "raw")
    (root / "raw/0").rename(root / "raw/z_zero")
    make_shards(str(root / "raw"), str(root / "eval"), progress=False)
    return str(root / "eval")


@pytest.mark.slow
def test_eval_classes_named_otherwise_are_refused_before_training(tiny_data, renamed_eval, tmp_path):
    r = run_train(tiny_overrides({**tiny_data, "eval": renamed_eval}, tmp_path / "run"))
    line = _refused(r, "data.eval has classes [1, 2, 3, 4, 5, 6, ... (10 in all)]", "data.labeled has [0, 1",
                    "only in data.eval: [z_zero], only in data.labeled: [0]", "data.class_match=by_name")
    assert not (tmp_path / "run/checkpoints").exists(), line


def test_class_match_maps_names_in_another_order_or_trusts_the_numbers(tiny_data, tmp_path):
    permuted = tmp_path / "eval"
    shutil.copytree(tiny_data["eval"], permuted)
    index = json.loads((permuted / "index.json").read_text())
    index["class_names"] = index["class_names"][::-1]  # same names, reversed order
    (permuted / "index.json").write_text(json.dumps(index))
    base = [f"data.labeled={tiny_data['labeled']}", f"data.unlabeled={tiny_data['unlabeled']}",
            f"data.eval={permuted}", "data.demo_root=null"]
    with pytest.raises(ConfigError, match="data.eval has classes"):
        check_classes(load_config(DEMO, base))
    maps = check_classes(load_config(DEMO, base + ["data.class_match=by_name"]))
    assert maps == {"eval": {0: list(range(9, -1, -1))}}  # eval label i is labeled class 9 - i
    assert check_classes(load_config(DEMO, base + ["data.class_match=by_index"])) == {}


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("override,needles,nproc", [  # under the launcher once; the check is the same for 1
    ("model.name=resnet_nope", ("model.name='resnet_nope' is not a timm model", "did you mean"), 2),
    ("model.pretrained={png}", ("is a PNG image, not weights",), 1),
    ("model.pretrained={folder}", ("is a folder but not a run of this project",), 1),
])
def test_a_wrong_model_name_or_pretrained_file_is_one_line_before_any_process_group(tiny_data, tmp_path, override,
                                                                                    needles, nproc):
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "grid.png")
    (tmp_path / "folder").mkdir()
    override = override.format(png=tmp_path / "grid.png", folder=tmp_path / "folder")
    r = run_train(tiny_overrides(tiny_data, tmp_path / "run", **dict([override.split("=", 1)])), nproc=nproc,
                  launcher="deepspeed")
    _refused(r, *needles)
    assert "process group" not in r.stderr.lower() and not (tmp_path / "run/checkpoints").exists()


def test_weights_are_told_from_other_files_by_their_first_bytes(tmp_path):
    import torch
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "a.safetensors"))
    torch.save({"w": torch.zeros(2)}, tmp_path / "b.pt")
    assert looks_like_weights((tmp_path / "a.safetensors").read_bytes()[:16])
    assert looks_like_weights((tmp_path / "b.pt").read_bytes()[:16])
    assert not looks_like_weights(b"\x89PNG\r\n\x1a\n" + b"\0" * 8)
    assert not looks_like_weights(b"model: resnet50\n")


def test_demo_data_is_built_only_for_the_demos_own_sets_and_null_is_accepted(tiny_data):
    from distssl.shards.demo import uses_demo_data

    assert uses_demo_data(load_config(DEMO).data)  # the demo itself
    own = [f"data.labeled={tiny_data['labeled']}", f"data.unlabeled={tiny_data['unlabeled']}",
           f"data.eval={tiny_data['eval']}"]
    assert not uses_demo_data(load_config(DEMO, own).data)  # a config based on the demo's, with the user's sets
    cfg = load_config(DEMO, own + ["data.demo_root=null", "deepspeed.template=null"])
    assert cfg.data.demo_root is None and not uses_demo_data(cfg.data)


@pytest.mark.slow
def test_make_shards_warns_when_class_folders_look_like_splits(tiny_data, tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "tools/make_shards.py"), str(tiny_data["raw"]), str(tmp_path / "o"),
                        "--dry-run"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "the class folders eval, train look like split folders" in r.stderr
    assert f"{tiny_data['raw']}/eval" in r.stderr
    r = subprocess.run([sys.executable, str(ROOT / "tools/make_shards.py"), str(tiny_data["raw"] / "train"),
                        str(tmp_path / "o2"), "--dry-run"], capture_output=True, text=True)
    assert r.returncode == 0 and "split folders" not in r.stderr


@pytest.mark.slow
def test_a_sweep_folder_is_not_resumed_with_other_settings(tiny_data, tmp_path):
    """The settings a sweep started with are kept beside it; a rerun that changes them is refused with
    the keys that differ, before Ray starts (resuming would replay the old sweep's trials)."""
    from distssl.tune import _write_settings, check_resumable, load_sweep

    tune_cfg = str(ROOT / "configs/tune/demo.yaml")
    args = tiny_overrides(tiny_data, tmp_path / "sweep", **{"train.steps": 100})
    first = load_sweep(tune_cfg, [*args, "tune.num_samples=2"])
    (tmp_path / "sweep").mkdir()
    _write_settings(first, str(tmp_path / "sweep"))
    check_resumable(load_sweep(tune_cfg, [*args, "tune.num_samples=2", "tune.num_cpus=2"]), str(tmp_path / "sweep"))
    r = subprocess.run([sys.executable, str(ROOT / "launch/tune.py"), "--config", tune_cfg, *args,
                        "tune.num_samples=3", "train.steps=60"], capture_output=True, text=True, timeout=120)
    line = _refused(r, "holds a sweep with other settings", "train.steps: 100 -> 60")
    assert "num_samples" not in line  # more trials is a sweep that grows (test_tune), not another sweep
    assert not (tmp_path / "sweep/ray").exists(), line


def test_a_failed_or_unfinished_trial_is_reported_plainly(tmp_path):
    from types import SimpleNamespace

    from distssl.tune import trial_status

    wrapped = RuntimeError("\x1b[36mray::_Inner.train()\x1b[39m (pid=4242, ip=127.0.0.1)\nTraceback (most recent call "
                           "last):\n  File \"x.py\", line 1\ndistssl.config.ConfigError: train.batch_size=3 must be "
                           "divisible by the world size 2")
    assert trial_status(SimpleNamespace(error=wrapped, metrics={}), 10) == (
        "ERROR", "distssl.config.ConfigError: train.batch_size=3 must be divisible by the world size 2")
    assert trial_status(SimpleNamespace(error=None, metrics={"config_error": "model.name='x'", "step": 0}), 10) == (
        "ERROR", "config error: model.name='x'")
    assert trial_status(SimpleNamespace(error=None, metrics={"step": 4}), 10) == ("STOPPED", "")  # ASHA stopped it
    done = {"step": 10, "out_dir": str(tmp_path)}
    status, error = trial_status(SimpleNamespace(error=None, metrics=done), 10)
    assert status == "ERROR" and "no summary.json" in error  # reported its last eval, then died
    (tmp_path / "summary.json").write_text("{}")
    assert trial_status(SimpleNamespace(error=None, metrics=done), 10) == ("TERMINATED", "")


def test_cpu_ranks_take_the_threads_they_were_given(monkeypatch):
    """Ray sets OMP_NUM_THREADS to the CPUs a trial's worker was given: two trials side by side must not
    each take every core."""
    from distssl.distributed.peers import cpu_threads

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert cpu_threads(world=1) == 1
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    import os
    assert cpu_threads(world=1) == (os.cpu_count() or 1)


@pytest.mark.slow
def test_a_sweep_with_ray_train_v2_switched_off_says_so(tiny_data, tmp_path):
    """A cluster image that exports Ray's V1 switch gets one line naming it, before Ray starts."""
    args = tiny_overrides(tiny_data, tmp_path / "sweep", **{"train.steps": 2})
    r = subprocess.run([sys.executable, str(ROOT / "launch/tune.py"), "--config", str(ROOT / "configs/tune/demo.yaml"),
                        *args], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "RAY_TRAIN_V2_ENABLED": "0"})
    line = _refused(r, "RAY_TRAIN_V2_ENABLED='0' switches Ray Train V2 off", "unset RAY_TRAIN_V2_ENABLED")
    assert "Traceback" not in r.stderr, line
    assert not (tmp_path / "sweep/ray").exists()
