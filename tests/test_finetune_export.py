"""Export -> timm loads it unchanged; fine-tuning from the export; pretrained loading and fine-tune knobs."""
import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, run_train, tiny_overrides
from distssl.config import load_config
from distssl.models.factory import create_model, fill_input_defaults, load_pretrained, param_groups


def _metrics(out: Path, kind: str) -> list[dict]:
    return [m for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if m["kind"] == kind]


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
    """A short FixMatch run on real digits; its export is the 'pretrained' model below."""
    out = tmp_path_factory.mktemp("pre") / "run"
    r = run_train(tiny_overrides(tiny_data, out, **{"train.steps": 60, "train.batch_size": 16,
                                                    "train.eval_every": 60, "train.ckpt_every": 60}))
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def _timm_load(weights: Path):
    import timm

    import distssl.models.factory  # noqa: F401 (wrn28_2)
    meta = json.loads(weights.with_suffix(".json").read_text())
    return timm.create_model(meta["architecture"], pretrained=True, num_classes=meta["num_classes"],
                             pretrained_cfg_overlay=dict(meta["pretrained_cfg"], file=str(weights))).eval(), meta


@pytest.mark.slow
def test_export_loads_in_timm_unchanged(trained, tiny_data, tmp_path):
    from safetensors.torch import load_file

    from distssl.data.index import resolve
    from distssl.data.samples import eval_item
    from distssl.data.streams import EvalStream
    from distssl.data.transforms import Views, normalize

    weights = trained / "model.safetensors"
    model, meta = _timm_load(weights)
    saved = load_file(str(weights))
    assert meta["num_classes"] == 10 and meta["class_names"] == [str(i) for i in range(10)]
    assert meta["input_size"] == [3, 28, 28]
    for k, v in model.state_dict().items():
        assert torch.equal(v, saved[k]), k  # every tensor, classifier included, as exported

    # tools/export_model.py on the final checkpoint writes the same tensors
    r = subprocess.run([sys.executable, str(ROOT / "tools/export_model.py"), str(trained), str(tmp_path / "x")],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    offline = load_file(str(tmp_path / "x" / "model.safetensors"))
    assert offline.keys() == saved.keys() and all(torch.equal(offline[k], saved[k]) for k in saved)

    # identical predictions: timm's model, fed as model.json says, scores what the run reported
    views = Views(meta["input_size"][-1], False, 0.125, 2, 0.5)
    stream = EvalStream(resolve(tiny_data["eval"]), rank=0, world_size=1, batch_size=50, make_item=eval_item(views))
    mean, std = torch.tensor(meta["mean"]), torch.tensor(meta["std"])
    correct = seen = 0
    with torch.no_grad():
        for b in stream:
            logits = model(normalize(b["x"], mean, std))
            correct += int((logits.argmax(1) == b["y"]).sum())
            seen += b["y"].numel()
    reported = _metrics(trained, "eval")[-1]
    assert seen == reported["eval_images"] == 97
    assert correct / seen == pytest.approx(reported["top1"], abs=1e-9)


@pytest.mark.slow
def test_finetune_from_export_is_far_above_scratch_after_one_step(trained, tiny_data, tmp_path):
    one = {"train.steps": 1, "train.eval_every": 1, "train.batch_size": 16}
    ft = run_train(tiny_overrides(tiny_data, tmp_path / "ft", **one,
                                  **{"model.pretrained": str(trained / "model.safetensors")}))
    sc = run_train(tiny_overrides(tiny_data, tmp_path / "sc", **one))
    assert ft.returncode == 0 and sc.returncode == 0, ft.stderr[-2000:] + sc.stderr[-2000:]
    top_ft, top_sc = _metrics(tmp_path / "ft", "eval")[-1]["top1"], _metrics(tmp_path / "sc", "eval")[-1]["top1"]
    assert _metrics(trained, "eval")[-1]["top1"] >= 0.3  # the pretrained model learned something (10% = chance)
    print(f"after 1 step: fine-tuned {top_ft:.3f}, scratch {top_sc:.3f}")
    assert top_ft >= top_sc + 0.2, (top_ft, top_sc)


@pytest.mark.slow
def test_freeze_backbone_trains_only_the_head(trained, tiny_data, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "frozen"
    r = run_train(tiny_overrides(tiny_data, out, **{
        "train.steps": 2, "model.pretrained": str(trained / "model.safetensors"), "model.freeze_backbone_steps": 2,
        "train.ema_decay": 0.0, "optim.weight_decay": 0.01}))  # EMA = live weights, so the export shows them
    assert r.returncode == 0, r.stderr[-3000:]
    before, after = load_file(str(trained / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert not torch.equal(before["fc.weight"], after["fc.weight"])
    params = dict(create_model("test_resnet", 10).named_parameters())
    for k in params:
        if not k.startswith("fc."):
            assert torch.equal(before[k], after[k]), k


@pytest.mark.slow
def test_pretrained_mismatches_are_named(trained, tmp_path, caplog):
    from safetensors.torch import load_file, save_file

    state = load_file(str(trained / "model.safetensors"))
    state["extra.weight"] = torch.zeros(3)
    del state["conv1.0.weight"]
    save_file(state, str(tmp_path / "odd.safetensors"))
    model = create_model("test_resnet", num_classes=5)
    with caplog.at_level(logging.WARNING):
        report = load_pretrained(model, str(tmp_path / "odd.safetensors"))
    assert report["unexpected"] == ["extra.weight"] and report["missing"] == ["conv1.0.weight"]
    assert sorted(report["reinitialised"]) == ["fc.bias", "fc.weight"]
    text = caplog.text
    assert "extra.weight" in text and "conv1.0.weight" in text
    assert re.search(r"classifier [^\n]*fc\.weight[^\n]* re-initialised", text)  # names in file order
    torch.testing.assert_close(model.state_dict()["layer1.0.conv1.weight"], state["layer1.0.conv1.weight"])

    save_file({"nothing.here": torch.zeros(1)}, str(tmp_path / "none.safetensors"))
    with pytest.raises(ValueError, match=r"only 0 of \d+ tensors of test_resnet match"):
        load_pretrained(create_model("test_resnet", 10), str(tmp_path / "none.safetensors"))
    # another architecture's export: refused, naming the counts and what its model.json declares
    with pytest.raises(ValueError, match=r"only \d+ of \d+ tensors of resnet18 match the file, which model.json "
                                         r"says is a test_resnet"):
        load_pretrained(create_model("resnet18", 10), str(trained / "model.safetensors"))
    torch.save({"w": torch.zeros(1), "obj": Path("x")}, tmp_path / "pickled.pt")  # needs unpickling a class
    with pytest.raises(ValueError, match="weights-only"):
        load_pretrained(create_model("test_resnet", 10), str(tmp_path / "pickled.pt"))


@pytest.mark.slow
def test_run_folder_as_pretrained_and_input_defaults(trained):
    model = create_model("test_resnet", 10, pretrained=str(trained))  # a run folder: its EMA weights
    from safetensors.torch import load_file
    saved = load_file(str(trained / "model.safetensors"))
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())

    cfg = load_config(ROOT / "configs/demo.yaml", ["data.image_size=null", "data.mean=null", "data.std=null",
                                                   f"model.pretrained={trained / 'model.safetensors'}"])
    fill_input_defaults(cfg)  # from the export's model.json
    assert (cfg.data.image_size, cfg.data.mean, cfg.data.std) == (28, [0.5] * 3, [0.25] * 3)
    cfg = load_config(ROOT / "configs/demo.yaml", ["data.image_size=null", "data.mean=null", "data.std=null",
                                                   "model.name=resnet18"])
    fill_input_defaults(cfg)  # from timm's pretrained config of the architecture
    assert cfg.data.image_size == 224 and cfg.data.mean == pytest.approx([0.485, 0.456, 0.406])


def test_param_groups_scale_backbone_and_decay_layers():
    model = create_model("test_resnet", 10)
    groups = param_groups(model, 5e-4, lr=0.1, backbone_lr_scale=0.1, layer_decay=0.5)
    head = [g for g in groups if g["is_head"]]
    assert head and all(g["lr"] == 0.1 for g in head)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    names = dict(model.named_parameters())
    # the stem is deepest from the top: its lr is the smallest; the last stage is one decay below the head
    assert lr_of[id(names["conv1.0.weight"])] < lr_of[id(names["layer1.0.conv1.weight"])] \
        < lr_of[id(names["layer4.0.conv1.weight"])] == pytest.approx(0.1 * 0.1 * 0.5)
    assert sum(len(g["params"]) for g in groups) == len(names)
    assert all(g["weight_decay"] == 0 for g in groups for p in g["params"] if p.ndim <= 1)


def test_wrn28_2_is_a_timm_model_with_grad_checkpointing():
    import timm

    model = create_model("wrn28_2", 10)
    assert 1.4e6 < sum(p.numel() for p in model.parameters()) < 1.6e6  # WRN-28-2: 1.5M parameters
    x = torch.randn(4, 3, 32, 32)
    torch.manual_seed(0)
    ref = timm.create_model("wrn28_2", num_classes=10)
    ckp = create_model("wrn28_2", 10, grad_checkpointing=True)
    ckp.load_state_dict(ref.state_dict())
    assert ckp.grad_checkpointing
    for m in (ref, ckp):
        m(x).square().sum().backward()
    for (n, a), (_, b) in zip(ref.named_parameters(), ckp.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=n)


@pytest.mark.slow
def test_bf16_autocast_run_keeps_fp32_weights_and_exports_them(tiny_data, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "bf16"
    r = run_train(tiny_overrides(tiny_data, out, **{"train.steps": 2, "train.precision": "bf16",
                                                    "train.micro_batch_size": 2}))
    assert r.returncode == 0, r.stderr[-3000:]
    exported = load_file(str(out / "model.safetensors"))
    assert all(t.dtype == torch.float32 for k, t in exported.items() if t.is_floating_point())
    assert [m["step"] for m in _metrics(out, "train")] == [1, 2]


@pytest.mark.slow
def test_rerunning_a_finished_run_leaves_its_outputs_as_they_are(trained, tiny_data):
    """The same command again (or a sweep trial restored after its last checkpoint) finds the run
    finished: it reports the final eval from summary.json and rewrites nothing."""
    outputs = [trained / name for name in ("summary.json", "model.safetensors", "model.json", "curves.png")]
    before = {p: p.stat().st_mtime_ns for p in outputs}
    r = run_train(tiny_overrides(tiny_data, trained, **{"train.steps": 60, "train.batch_size": 16,
                                                        "train.eval_every": 60, "train.ckpt_every": 60}))
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads((trained / "summary.json").read_text())
    assert f"already finished at step 60: eval top-1 {100 * summary['top1']:.2f}%" in r.stdout + r.stderr
    assert {p: p.stat().st_mtime_ns for p in outputs} == before
