"""data.decode_on=device: JPEGs leave the loader undecoded with their crop box and view choices, drawn as
the loader path draws them; decoded batched on the device they give the loader path's bases (exactly
where the loader decodes at full scale, within JPEG DCT-scaling rounding where it decodes large photos
smaller); a batch mixes JPEGs with images decoded in the loader; a file that cannot be decoded is
replaced and counted."""
import io
import json
import random
import sys
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image

from distssl.data.device_decode import decode_batch, encoded_base, jpeg_size
from distssl.data.samples import labeled_encoded_item, labeled_item, unlabeled_encoded_item, unlabeled_plan_item
from distssl.data.streams import Raw, collate
from distssl.data.transforms import Views, to_uint8

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools/bench"))
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    from common import photo_jpegs

    return [p.read_bytes() for p in photo_jpegs(tmp_path_factory.mktemp("photos"), 12)]


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    from common import real_images

    return [p.read_bytes() for p in real_images(tmp_path_factory.mktemp("digits"), 12, 28)]


def _batch(items: list[dict]) -> dict:
    return collate(items)


def _decode(batch: dict, views: Views):
    return decode_batch(batch["bytes_image"], batch["bytes_image_lengths"], batch["decoded"], batch["box"],
                        views.image_size, views.interpolation, CPU)


def _png(data: bytes) -> bytes:
    buf = io.BytesIO()
    Image.open(io.BytesIO(data)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("crop", ["random_resized", "pad"])
def test_the_same_seeds_give_the_same_choices_and_the_loader_paths_pixels(digits, crop):
    """Digits (28 px JPEGs, decoded at full scale by both paths): the device's bases are the loader's, pixel
    for pixel (crop=pad resizes with PIL in the loader: its bicubic rounds a pixel in ~700 one level
    apart from torch's), and the rng is left where Views.base leaves it, so every later draw is the same."""
    views = Views(64, crop=crop, crop_scale=(0.5, 1.0), interpolation="bicubic", flip=False)
    rngs_loader = [random.Random(i) for i in range(len(digits))]
    loader = torch.stack([to_uint8(views.base(d, r)) for d, r in zip(digits, rngs_loader)])
    rngs_device = [random.Random(i) for i in range(len(digits))]
    batch = _batch([encoded_base(views, d, r) for d, r in zip(digits, rngs_device)])
    assert not batch["decoded"].any() and batch["bytes_image"].numel() == sum(len(d) for d in digits)
    base, bad = _decode(batch, views)
    diff = (base.int() - loader.int()).abs()
    assert bad == 0 and (torch.equal(base, loader) if crop == "random_resized" else diff.max() <= 1)
    assert [r.random() for r in rngs_device] == [r.random() for r in rngs_loader]


def test_the_device_decoder_is_torchcodecs_and_warns_of_nothing(digits):
    """TorchCodec's decode_jpeg, not torchvision's (deprecated in 0.29 "in favour of TorchCodec"): no warning
    of any kind is raised by a batch's decode."""
    views = Views(32, crop="pad", flip=False)
    batch = _batch([encoded_base(views, d, random.Random(i)) for i, d in enumerate(digits)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, bad = _decode(batch, views)
    assert bad == 0


def test_without_the_decode_extra_a_device_decode_run_is_refused_in_one_line(monkeypatch):
    from distssl.config import load_config
    from distssl.errors import MissingExtra
    from distssl.train import preflight

    monkeypatch.setitem(sys.modules, "torchcodec.decoders", None)  # as if not installed: its import fails
    cfg = load_config("configs/demo.yaml", ["data.decode_on=device", "data.demo_root=null"])
    with pytest.raises(MissingExtra, match=r'data.decode_on=device needs torchcodec.*pip install "distssl\[decode\]"'):
        preflight.check(cfg)


def test_large_photos_agree_within_the_dct_scaling_tolerance(photos):
    """500x375 photos to 224-px random-resized crops: the loader decodes at 1/2 or 1/4 DCT scale when the
    crop allows, the device at full scale. Measured: mean |difference| 2.5 of 255, 61% of pixels equal
    (docs/benchmarks.md); the bound here is 4 levels on average."""
    views = Views(224, crop="random_resized", interpolation="bicubic")
    loader = torch.stack([to_uint8(views.base(d, random.Random(i))) for i, d in enumerate(photos)])
    base, bad = _decode(_batch([encoded_base(views, d, random.Random(i)) for i, d in enumerate(photos)]), views)
    diff = (base.int() - loader.int()).abs().float()
    assert bad == 0 and diff.mean() < 4.0 and (diff == 0).float().mean() > 0.3


def test_a_batch_mixes_jpegs_with_images_decoded_in_the_loader(digits):
    views = Views(32, crop="pad", interpolation="bilinear")
    datas = [digits[0], _png(digits[1]), digits[2]]
    assert jpeg_size(datas[0]) == (28, 28) and jpeg_size(datas[1]) is None
    batch = _batch([encoded_base(views, d, random.Random(i)) for i, d in enumerate(datas)])
    assert batch["decoded"].tolist() == [False, True, False]
    assert batch["bytes_image_lengths"][1] == 3 * 32 * 32  # the PNG travels as its base's pixels
    base, bad = _decode(batch, views)
    want = torch.stack([to_uint8(views.base(d, random.Random(i))) for i, d in enumerate(datas)])
    assert bad == 0 and torch.equal(base, want)


def _without_quantization_tables(data: bytes) -> bytes:
    out, i = bytearray(data[:2]), 2
    while i < len(data) and data[i] == 0xFF and data[i + 1] != 0xDA:  # the header's segments, up to the scan
        length = int.from_bytes(data[i + 2:i + 4], "big")
        if data[i + 1] != 0xDB:  # DQT
            out += data[i:i + 2 + length]
        i += 2 + length
    return bytes(out + data[i:])


def test_an_undecodable_jpeg_is_replaced_by_another_sample_and_counted(digits):
    views = Views(32, crop="pad", interpolation="bilinear")
    broken = _without_quantization_tables(digits[1])  # a valid header, but no decoder can read its scan
    items = [encoded_base(views, d, random.Random(0)) for d in (digits[0], broken, digits[2])]
    assert not items[1]["decoded"]  # the header parses: the loader cannot tell
    base, bad = _decode(_batch(items), views)
    assert bad == 1 and base.shape == (3, 3, 32, 32)
    assert torch.equal(base[1], base[0]) or torch.equal(base[1], base[2])


def test_labeled_and_unlabeled_items_draw_the_plans_of_the_device_view_path(digits):
    """decode_on=device draws box, then the views' plans, in the loader path's order: the plans equal those
    of augment_on=device for the same sample seeds, and the labeled view's flip/crop those of the loader."""
    views = Views(32, crop="random_resized", crop_scale=(0.5, 1.0), interpolation="bicubic")
    raw = Raw("k", {"jpg": digits[3], "cls": b"7", "json": json.dumps({"label": 7}).encode()}, index=0)
    enc = unlabeled_encoded_item(views, wanted=("weak", "strong"))(raw, random.Random(5))
    plan = unlabeled_plan_item(views, wanted=("weak", "strong"))(raw, random.Random(5))
    assert torch.equal(enc["plan_weak"], plan["plan_weak"]) and torch.equal(enc["plan_strong"], plan["plan_strong"])
    assert enc["y_true"] == plan["y_true"] == 7 and enc["idx"] == plan["idx"]
    lab = labeled_encoded_item(views)(raw, random.Random(9))
    assert lab["y"] == 7 and lab["plan_x"].shape == (3,)
    from distssl.data.device_augment import apply_weak, pad_pixels

    base, _ = _decode(_batch([lab]), views)
    x = apply_weak(base, lab["plan_x"][None], pad_pixels(views))
    assert torch.equal(x[0], labeled_item(views)(raw, random.Random(9))["x"])  # the loader path's labeled view


@pytest.fixture(scope="module")
def jpeg_data(tmp_path_factory):
    """The tiny digits as JPEG shards (the device decodes JPEGs only)."""
    from conftest import export_digits
    from distssl.shards import ImageOptions, make_shards

    root = tmp_path_factory.mktemp("jpeg")
    export_digits(root / "raw", n_train=600, n_eval=97)
    jpg = ImageOptions(format="jpg")
    make_shards(str(root / "raw/train"), str(root / "shards/train"), labels_per_class=2, max_count=50,
                progress=False, image=jpg)
    make_shards(str(root / "raw/eval"), str(root / "shards/eval"), max_count=40, progress=False, image=jpg)
    return {"root": root, "labeled": str(root / "shards/train/labeled"),
            "unlabeled": str(root / "shards/train/unlabeled"), "eval": str(root / "shards/eval")}


@pytest.mark.slow
def test_a_run_decoding_on_the_device_resumes_exactly(jpeg_data, tmp_path):
    """Every training image decoded by the trainer (labeled and unlabeled, random-resized crops, two loader
    workers): resumed from its step-4 checkpoint, a run logs again the losses it logged going straight to 8."""
    import shutil

    from conftest import run_train, tiny_overrides

    def train(out, steps):
        r = run_train(tiny_overrides(jpeg_data, out, **{
            "data.decode_on": "device", "data.crop": "random_resized", "data.crop_scale": "[0.5,1.0]",
            "data.image_size": 32, "train.steps": steps, "train.ckpt_every": 4, "train.eval_every": 8,
            "train.num_workers": 2}))
        assert r.returncode == 0, r.stderr[-3000:]
        return {d["step"]: d["loss"] for d in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
                if "loss" in d}

    straight = train(tmp_path / "straight", 8)
    shutil.copytree(tmp_path / "straight", tmp_path / "resumed")
    for p in (tmp_path / "resumed").iterdir():  # back to step 4: its checkpoint, none of the outputs
        if p.name.startswith(("model", "summary")):
            p.unlink()
    shutil.rmtree(tmp_path / "resumed/checkpoints/step_00000008")
    resumed = train(tmp_path / "resumed", 8)
    assert sorted(resumed) == list(range(1, 9))
    assert [resumed[s] for s in range(5, 9)] == pytest.approx([straight[s] for s in range(5, 9)], rel=1e-5)
    summary = json.loads((tmp_path / "straight/summary.json").read_text())
    assert summary["eval_images"] == 97 and summary["eval_skipped"] == 0
