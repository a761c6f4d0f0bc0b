import subprocess
import sys

import pytest
import yaml

from conftest import ROOT
from distssl.config import ConfigError, load_config, resume_conflicts, to_dict

DEMO = str(ROOT / "configs/demo.yaml")


def test_demo_config_loads_and_overrides_apply_with_types():
    cfg = load_config(DEMO, ["ssl.tau=0.9", "train.steps=7", "ssl.dist_align=false", "data.mean=[0.1,0.2,0.3]"])
    assert cfg.ssl.tau == 0.9 and cfg.train.steps == 7 and cfg.ssl.dist_align is False
    assert cfg.data.mean == [0.1, 0.2, 0.3]
    assert isinstance(load_config(DEMO, ["optim.lr=1"]).optim.lr, float)  # an int where a float is expected


@pytest.mark.parametrize("override,needle", [
    ("ssl.taux=0.9", "ssl.taux"),
    ("nosuch.key=1", "nosuch"),
    ("ssl.tau=1.5", "ssl.tau"),
    ("ssl.tau=0", "ssl.tau"),
    ("ssl.mu=0", "ssl.mu"),
    ("deepspeed.zero_stage=4", "deepspeed.zero_stage"),
    ("train.steps=ten", "train.steps"),
    ("ssl.dist_align=maybe", "ssl.dist_align"),
    ("ssl.dist_align_target=prior", "ssl.dist_align_target"),
    ("ssl.lambda_u=-1", "ssl.lambda_u"),
    ("justaword", "key=value"),
    ("data.crop=center", "data.crop"),
    ("data.crop_scale=[0.5]", "data.crop_scale"),
    ("data.crop_scale=[0.9,0.5]", "data.crop_scale"),
    ("data.crop_ratio=[0,1]", "data.crop_ratio"),
    ("data.eval_crop_pct=1.5", "data.eval_crop_pct"),
    ("data.interpolation=lanczos", "data.interpolation"),
    ("data.augment_on=gpu", "data.augment_on"),
    ("data.interleave_shards=0", "data.interleave_shards"),
])
def test_bad_values_name_the_key(override, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load_config(DEMO, [override])


def test_resume_conflicts_list_breaking_keys_only():
    cfg = load_config(DEMO)
    saved = to_dict(cfg)
    assert resume_conflicts(saved, load_config(DEMO, ["train.steps=5000", "train.eval_every=7"])) == []
    conflicts = resume_conflicts(saved, load_config(DEMO, ["ssl.tau=0.8", "ssl.mu=3"]))
    assert [c.split(":")[0] for c in conflicts] == ["ssl.mu", "ssl.tau"]


def _cli(*args):
    return subprocess.run([sys.executable, str(ROOT / "launch/train.py"), "--config", DEMO, *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)


@pytest.mark.slow
@pytest.mark.parametrize("args,needle", [
    (["ssl.tau=1.5"], "ssl.tau"),
    (["ssl.taux=0.9"], "taux"),
    (["data.demo_root=", "data.labeled=/nonexistent/shards"], "data.labeled"),
    (["deepspeed.zero_stage=7"], "deepspeed.zero_stage"),
])
def test_cli_exits_nonzero_with_one_clear_line_and_no_traceback(tmp_path, args, needle):
    r = _cli(f"run.out_dir={tmp_path / 'run'}", *args)
    assert r.returncode != 0
    assert needle in r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    assert len(r.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_cli_refuses_a_resume_whose_config_broke_it(tiny_data, tmp_path):
    from conftest import tiny_overrides
    out = tmp_path / "run"
    (out / "checkpoints/step_00000002").mkdir(parents=True)
    (out / "checkpoints/step_00000002/COMPLETE").write_text("{}")
    cfg = load_config(DEMO, tiny_overrides(tiny_data, out))
    (out / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg)))
    r = _cli(*tiny_overrides(tiny_data, out, **{"ssl.tau": 0.7, "optim.lr": 0.1}))
    assert r.returncode != 0
    assert "ssl.tau" in r.stderr and "optim.lr" in r.stderr and "Traceback" not in r.stderr


def test_credentials_in_urls_never_reach_config_yaml(tmp_path):
    from distssl.config import dump_yaml
    cfg = load_config(DEMO, ["data.unlabeled=s3://AKIDEXAMPLE:s3cr3tKey@bucket/shards/unlabeled"])
    dump_yaml(cfg, tmp_path / "config.yaml")
    text = (tmp_path / "config.yaml").read_text()
    assert "s3cr3tKey" not in text and "AKIDEXAMPLE" not in text and "bucket/shards/unlabeled" in text
    # and the redacted file still matches the same config when a run resumes
    assert resume_conflicts(yaml.safe_load(text), cfg) == []


@pytest.mark.parametrize("name", ["demo.yaml", "cifar10.yaml", "imagenet.yaml", "vit_finetune.yaml"])
def test_shipped_configs_load_and_resolve(name):
    from distssl.models.factory import fill_input_defaults
    from distssl.train.optim import accumulation, deepspeed_config

    cfg = load_config(str(ROOT / "configs" / name))
    fill_input_defaults(cfg)
    assert cfg.data.image_size and len(cfg.data.mean) == 3 and len(cfg.data.std) == 3
    for world in (1, 8, 32):  # the global batch does not depend on the number of GPUs
        if cfg.train.batch_size % world:
            continue
        micro, accum = accumulation(cfg, world)
        ds = deepspeed_config(cfg, micro, world, accum)
        assert ds["train_batch_size"] == cfg.train.batch_size
    if name == "imagenet.yaml":
        assert (cfg.ssl.tau, cfg.ssl.lambda_u, cfg.ssl.mu, cfg.model.name) == (0.7, 10.0, 5, "resnet50")
        assert accumulation(cfg, 8) == (32, 4) and accumulation(cfg, 32) == (32, 1)
        assert ds["torch_autocast"]["enabled"] and cfg.data.mean == pytest.approx([0.485, 0.456, 0.406])
        # FixMatch's ImageNet input: a random-resized crop, evaluated on a 0.875 centre crop, bicubic
        assert (cfg.data.crop, cfg.data.eval_crop_pct, cfg.data.interpolation) == ("random_resized", 0.875, "bicubic")
    elif name == "vit_finetune.yaml":  # MAE's fine-tuning recipe: AdamW, layer decay, drop path
        assert (cfg.optim.name, cfg.optim.layer_decay, cfg.model.drop_path_rate) == ("adamw", 0.65, 0.1)
        assert cfg.data.crop == "random_resized" and cfg.data.mean == pytest.approx([0.5] * 3)
    else:  # the CIFAR recipe: pad crops, evaluated on the whole image
        assert cfg.data.crop == "pad" and cfg.data.eval_crop_pct == 1.0


def test_eval_crop_and_interpolation_default_to_the_models_pretrained_config():
    from distssl.models.factory import fill_input_defaults

    cfg = load_config(str(ROOT / "configs/imagenet.yaml"), ["data.eval_crop_pct=null", "data.interpolation=null",
                                                             "model.name=convnext_tiny"])
    filled = fill_input_defaults(cfg)
    assert (cfg.data.eval_crop_pct, cfg.data.interpolation) == (0.95, "bicubic")  # convnext_tiny's pretrained cfg
    assert "data.eval_crop_pct=0.95" in filled


def test_a_moved_key_names_its_new_place_and_a_saved_run_with_it_resumes(tmp_path):
    """ssl.ema_decay, ssl.ema_warmup and ssl.weak_forward are read by the training loop, so they sit in train:
    the old name, given on the command line or in a file, is refused in one line naming the new one; a run
    saved before the move (its config.yaml with the old names) resumes as the same run."""
    with pytest.raises(ConfigError, match=r"^ssl\.ema_decay is now train\.ema_decay .*give train\.ema_decay=0\.99$"):
        load_config(str(ROOT / "configs/demo.yaml"), ["ssl.ema_decay=0.99"])
    old = tmp_path / "old.yaml"
    tree = yaml.safe_load((ROOT / "configs/demo.yaml").read_text())
    tree["ssl"]["weak_forward"] = "concat"
    old.write_text(yaml.safe_dump(tree))
    with pytest.raises(ConfigError, match=rf"^ssl\.weak_forward is now train\.weak_forward .*{old}$"):
        load_config(str(old))
    cfg = load_config(str(ROOT / "configs/demo.yaml"), ["train.weak_forward=concat", "train.ema_decay=0.99"])
    saved = to_dict(cfg)
    for key in ("ema_decay", "ema_warmup", "weak_forward"):  # as config.yaml was written before the move
        saved["ssl"][key] = saved["train"].pop(key)
    assert resume_conflicts(saved, cfg) == []
    saved["ssl"]["ema_decay"] = 0.9  # a real change is still one
    assert resume_conflicts(saved, cfg) == ["train.ema_decay: 0.9 -> 0.99"]
