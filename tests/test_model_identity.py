"""A model knows its identity: an export writes one fingerprint into its weights' header and its model.json,
and every consumer refuses a pair that are not one export, in one line naming both files and what differs,
before it reads an image. Exports that predate fingerprints load with a notice."""
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from distssl.models import identity
from distssl.models.export import model_meta, write_export
from distssl.models.factory import pretrained_meta
from distssl.predict.model import load_predictor
from support.servers import launch_env

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


def export(folder: Path, names: list[str], run: str, step: int, temperature=None, arch="test_resnet") -> Path:
    torch.manual_seed(step)
    model = timm.create_model(arch, num_classes=len(names))
    return write_export(model.state_dict(), model_meta(arch, len(names), 28, [0.5] * 3, [0.25] * 3, names,
                                                       run=run, step=step, temperature=temperature), folder)


@pytest.fixture
def two_runs(tmp_path):
    digits = export(tmp_path / "digits", [str(i) for i in range(10)], "runs/digits", 300, temperature=1.7)
    animals = export(tmp_path / "animals", [f"animal_{i}" for i in range(10)], "runs/animals", 20, temperature=1.2)
    return digits, animals


def test_the_weights_header_and_model_json_carry_one_fingerprint(two_runs):
    digits, _ = two_runs
    meta = json.loads(digits.with_suffix(".json").read_text())
    header = identity.safetensors_metadata(str(digits))
    assert meta["fingerprint"] == {k: header[k] for k in identity.FIELDS}
    assert header["run"] == "runs/digits" and header["step"] == "300" and float(header["temperature"]) == 1.7
    assert header["classes_sha256"] == identity.classes_hash([str(i) for i in range(10)])
    assert load_predictor(str(digits), CPU).temperature == 1.7


def test_weights_beside_another_runs_model_json_are_refused_naming_both_and_what_differs(two_runs, tmp_path):
    digits, animals = two_runs
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "model.safetensors").write_bytes(animals.read_bytes())
    (mixed / "model.json").write_bytes(digits.with_suffix(".json").read_bytes())  # same architecture and count
    with pytest.raises(identity.ModelMismatch) as e:
        load_predictor(str(mixed), CPU)
    line = str(e.value)
    assert "\n" not in line and str(mixed / "model.safetensors") in line and str(mixed / "model.json") in line
    for differs in ("classes_sha256", "run runs/animals vs runs/digits", "step 20 vs 300", "temperature 1.2 vs 1.7"):
        assert differs in line
    assert "architecture" not in line and "num_classes" not in line  # what agrees is not named


def test_an_export_from_before_fingerprints_loads_with_a_notice_and_another_architecture_is_refused(tmp_path, caplog):
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=10)
    meta = model_meta("test_resnet", 10, 28, [0.5] * 3, [0.25] * 3, [], run="old", step=1)
    meta.pop("fingerprint")
    old = tmp_path / "old"
    old.mkdir()
    save_file(model.state_dict(), str(old / "model.safetensors"),
              metadata={"format": "pt", "architecture": "test_resnet"})
    (old / "model.json").write_text(json.dumps(meta))  # what exports wrote before 2026-12
    with caplog.at_level(logging.WARNING, logger="distssl.models.identity"):
        assert load_predictor(str(old), CPU).meta["architecture"] == "test_resnet"
    assert sum("has no fingerprint" in r.getMessage() for r in caplog.records) == 1
    (old / "model.json").write_text(json.dumps({**meta, "architecture": "resnet18"}))
    with pytest.raises(identity.ModelMismatch, match="holds a test_resnet, .* describes a resnet18"):
        load_predictor(str(old), CPU)


def test_one_side_without_a_fingerprint_is_refused(two_runs, tmp_path):
    digits, _ = two_runs
    meta = json.loads(digits.with_suffix(".json").read_text())
    meta.pop("fingerprint")
    digits.with_suffix(".json").write_text(json.dumps(meta))
    with pytest.raises(identity.ModelMismatch, match="model.json has no fingerprint and the other has"):
        load_predictor(str(digits), CPU)


def test_weights_of_another_class_count_are_one_line_not_a_size_mismatch_traceback(tmp_path):
    """No fingerprint to compare (an old export): the shapes are, before load_state_dict's 87 lines."""
    from distssl.errors import UserError

    torch.manual_seed(0)
    twenty = timm.create_model("test_resnet", num_classes=20)
    meta = model_meta("test_resnet", 10, 28, [0.5] * 3, [0.25] * 3, [], run="old", step=1)
    meta.pop("fingerprint")
    save_file(twenty.state_dict(), str(tmp_path / "model.safetensors"),
              metadata={"format": "pt", "architecture": "test_resnet"})
    (tmp_path / "model.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match=r"do not fit test_resnet with 10 classes \(fc.bias: \(20,\) in the file"):
        load_predictor(str(tmp_path), CPU)


def test_model_pretrained_checks_the_json_it_takes_the_input_size_from(two_runs, tmp_path):
    digits, animals = two_runs
    (animals.parent / "model.json").write_bytes(digits.with_suffix(".json").read_bytes())
    with pytest.raises(identity.ModelMismatch):
        pretrained_meta(str(animals))
    assert pretrained_meta(str(digits))["class_names"] == [str(i) for i in range(10)]


@pytest.mark.slow
def test_distssl_predict_refuses_the_pair_in_one_line_exit_2_and_writes_nothing(two_runs, tiny_data, tmp_path):
    digits, animals = two_runs
    (animals.parent / "model.json").write_bytes(digits.with_suffix(".json").read_bytes())
    out = tmp_path / "pred"
    r = subprocess.run([sys.executable, str(ROOT / "launch/predict.py"), str(animals), "--data", tiny_data["eval"],
                        "--out", str(out), "--quiet"], capture_output=True, text=True, timeout=300, cwd=ROOT,
                       env=launch_env())
    said = [line for line in (r.stdout + r.stderr).splitlines() if line.strip()]
    assert r.returncode == 2 and len(said) == 1, r.stdout + r.stderr
    assert "are not one model" in said[0] and str(animals) in said[0]
    assert not list(out.rglob("*.parquet")) and not (out / "summary.json").exists()
