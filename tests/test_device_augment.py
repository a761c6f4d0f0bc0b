"""data.augment_on=device: the views made batched on the training device from the loader's base crops
and the random choices it drew, against the loader path (PIL) with the same sample seeds."""
import io
import random
from collections import defaultdict

import numpy as np
import pytest
import torch
from PIL import Image

from distssl.data import device_augment as dev
from distssl.data.transforms import POOL, Views, to_uint8


@pytest.fixture(scope="module")
def photo():
    from sklearn.datasets import load_sample_images

    arr = load_sample_images().images[0][:375, :500]
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.mark.parametrize("crop", ["pad", "random_resized"])
def test_views_match_the_loader_path_for_the_same_sample_seeds(photo, crop):
    views = Views(64, flip=True, pad_fraction=0.125, randaugment_ops=2, cutout_fraction=0.5, crop=crop,
                  interpolation="bicubic")
    pad = dev.pad_pixels(views)
    diffs_by_op = defaultdict(list)
    for seed in range(300):
        host_rng, dev_rng = random.Random(seed), random.Random(seed)
        base_h, base_d = views.base(photo, host_rng), views.base(photo, dev_rng)
        weak_h, strong_h = views.weak(base_h, host_rng), views.strong(base_h, host_rng)
        plan_w, plan_s = dev.weak_plan(views, dev_rng), dev.strong_plan(views, dev_rng)
        assert host_rng.random() == dev_rng.random()  # the same draws, in the same order
        base = to_uint8(base_d)[None]
        weak_d = dev.apply_weak(base, torch.tensor([plan_w]), pad)[0]
        strong_d = dev.apply_strong(base, torch.tensor([plan_s]), pad, 2, 0.5)[0]
        assert torch.equal(weak_d, weak_h)  # flip + reflect-padded crop: the same pixels
        ops = plan_s[3:11]
        applied = tuple(sorted(int(ops[i]) for i in (0, 4) if ops[i + 2] > 0.5))
        diff = (strong_d.float() - strong_h.float()).abs()
        diffs_by_op[applied].append(float(diff.mean()))
        if not applied:
            assert torch.equal(strong_d, strong_h)
    # every op of the pool was drawn, and each matches PIL up to its rounding
    assert {op for ops in diffs_by_op for op in ops} == set(range(len(POOL)))
    worst = {ops: max(d) for ops, d in diffs_by_op.items()}
    # measured: 0.02 grey levels mean for most pairs; autocontrast's rounding then posterize, 0.7
    assert max(worst.values()) < 1.0, sorted(worst.items(), key=lambda kv: -kv[1])[:5]


def test_a_batch_is_the_samples_made_one_by_one(photo):
    views = Views(48, flip=True, pad_fraction=0.125, randaugment_ops=2, cutout_fraction=0.5,
                  crop="random_resized", interpolation="bicubic")
    bases, plans = [], []
    for seed in range(40):
        rng = random.Random(seed)
        bases.append(to_uint8(views.base(photo, rng)))
        dev.weak_plan(views, rng)
        plans.append(dev.strong_plan(views, rng))
    batch = dev.apply_strong(torch.stack(bases), torch.tensor(plans), 0, 2, 0.5)
    for i in range(40):
        alone = dev.apply_strong(bases[i][None], torch.tensor(plans[i:i + 1]), 0, 2, 0.5)[0]
        assert torch.equal(batch[i], alone)
    assert batch.dtype == torch.uint8 and batch.shape == (40, 3, 48, 48)
    assert np.mean([float((batch[i] != bases[i]).float().mean()) for i in range(40)]) > 0.2  # it does augment


@pytest.mark.slow
def test_a_run_with_random_resized_crops_and_views_on_device_exports_an_eval_timm_reproduces(tiny_data, tmp_path):
    """The ImageNet path end to end (at 32 px on digits): random-resized crops, views made on the
    training device, eval at crop_pct 0.875 bicubic; timm, given only model.json, scores what the run
    reported on the same eval images."""
    import json
    import tarfile

    import timm

    from conftest import run_train, tiny_overrides

    out = tmp_path / "run"
    r = run_train(tiny_overrides(tiny_data, out, **{
        "data.crop": "random_resized", "data.crop_scale": "[0.5,1.0]", "data.image_size": 32,
        "data.eval_crop_pct": 0.875, "data.interpolation": "bicubic", "data.augment_on": "device",
        "train.steps": 30, "train.eval_every": 30, "train.batch_size": 16, "train.num_workers": 1}))
    assert r.returncode == 0, r.stderr[-3000:]
    reported = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
                if '"eval"' in line][-1]
    train = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"train"' in line]
    assert train[-1]["step"] == 30 and train[-1]["loss"] == train[-1]["loss"]  # trained, no NaN
    meta = json.loads((out / "model.json").read_text())
    model = timm.create_model(meta["architecture"], pretrained=True, num_classes=meta["num_classes"],
                              pretrained_cfg_overlay=dict(meta["pretrained_cfg"], file=str(out / "model.safetensors")))
    cfg = timm.data.resolve_data_config({}, model=model.eval())
    assert cfg["crop_pct"] == 0.875 and cfg["interpolation"] == "bicubic" and tuple(cfg["input_size"]) == (3, 32, 32)
    transform = timm.data.create_transform(**cfg)
    from distssl.data.transforms import normalize
    views = Views(32, crop="random_resized", interpolation="bicubic", eval_crop_pct=0.875)
    mean, std = torch.tensor(meta["mean"]), torch.tensor(meta["std"])
    right = total = 0
    with torch.no_grad():
        for shard in sorted((tiny_data["root"] / "shards/eval").glob("*.tar")):
            with tarfile.open(shard) as t:
                files = {m.name: t.extractfile(m).read() for m in t.getmembers()}
            for name, data in files.items():
                if name.endswith(".png"):
                    y = int(files[name[:-4] + ".cls"])
                    x = transform(Image.open(io.BytesIO(data)).convert("RGB"))[None]
                    ours = normalize(views.eval(views.eval_image(data))[None], mean, std)
                    assert torch.allclose(ours, x, atol=1e-6)  # the run's eval input, pixel for pixel
                    right += int(model(x).argmax(1).item() == y)
                    total += 1
    assert total == reported["eval_images"] == 97
    assert right / total == pytest.approx(reported["top1"], abs=1e-9)
