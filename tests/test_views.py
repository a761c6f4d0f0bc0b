"""The ImageNet views: one random-resized crop per image as the base of both views, and an eval
transform that timm rebuilds from the exported model.json."""
import io
import random

import numpy as np
import pytest
import torch
from PIL import Image

from distssl.data.transforms import Views, random_resized_box
from distssl.models.export import model_meta


def _photo(fmt: str, w: int = 500, h: int = 375) -> bytes:
    """A real photo (scikit-learn ships two) cropped and encoded at ImageNet's typical size."""
    from sklearn.datasets import load_sample_images

    arr = load_sample_images().images[0][:h, :w]
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def test_random_resized_boxes_follow_the_scale_and_ratio_limits():
    rng = random.Random(0)
    areas, ratios = [], []
    for _ in range(2000):
        left, top, w, h = random_resized_box(500, 375, (0.08, 1.0), (3 / 4, 4 / 3), rng)
        assert 0 <= left and left + w <= 500 and 0 <= top and top + h <= 375
        areas.append(w * h / (500 * 375))
        ratios.append(w / h)
    assert 0.07 < min(areas) < 0.15 and max(areas) > 0.9  # the whole 8-100% range is drawn
    assert min(ratios) > 0.72 and max(ratios) < 1.37
    # an image too narrow for any allowed ratio: the central crop at the nearest allowed ratio
    assert random_resized_box(100, 400, (0.9, 1.0), (3 / 4, 4 / 3), random.Random(1)) == (0, 133, 100, 133)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_one_crop_is_the_base_of_both_views_and_is_seeded(fmt):
    data = _photo(fmt)
    views = Views(224, flip=True, crop="random_resized", crop_scale=(0.08, 1.0), interpolation="bicubic")
    a, b = views.base(data, random.Random(5)), views.base(data, random.Random(5))
    assert a.size == (224, 224) and np.array_equal(np.asarray(a), np.asarray(b))  # resume sees the same crop
    other = views.base(data, random.Random(6))
    assert not np.array_equal(np.asarray(a), np.asarray(other))
    rng = random.Random(7)
    weak, strong = views.weak(a, rng), views.strong(a, rng)
    assert weak.shape == strong.shape == (3, 224, 224) and weak.dtype == torch.uint8
    # the weak view is the crop itself, flipped or not: no pad crop on top of a random-resized base
    base = torch.from_numpy(np.asarray(a).copy()).permute(2, 0, 1)
    assert torch.equal(weak, base) or torch.equal(weak, base.flip(2))


def test_the_crop_decodes_a_large_jpeg_at_reduced_scale_without_changing_the_picture():
    """A whole-image crop of an 1000x750 JPEG decodes at 1/2 or 1/4 scale (DCT scaling): the result
    matches a full decode resized the same way to within JPEG rounding."""
    from sklearn.datasets import load_sample_images

    arr = np.asarray(Image.fromarray(load_sample_images().images[1]).resize((1000, 750)))
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=95)
    views = Views(224, crop="random_resized", crop_scale=(1.0, 1.0), crop_ratio=(4 / 3, 4 / 3),
                  interpolation="bicubic")
    ours = np.asarray(views.base(buf.getvalue(), random.Random(0)), dtype=np.float32)
    full = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB").resize((224, 224), Image.BICUBIC),
                      dtype=np.float32)
    assert np.abs(ours - full).mean() < 4  # of 255


@pytest.mark.parametrize("size,crop_pct,interpolation", [(224, 0.875, "bicubic"), (64, 0.875, "bilinear"),
                                                         (32, 1.0, "bilinear")])
def test_eval_view_is_what_timm_builds_from_the_exported_model_json(size, crop_pct, interpolation):
    import timm

    data = _photo("PNG")
    views = Views(size, crop="random_resized", interpolation=interpolation, eval_crop_pct=crop_pct)
    ours = views.eval(views.eval_image(data)).float() / 255
    meta = model_meta("test_resnet", 10, size, [0, 0, 0], [1, 1, 1], [], crop_pct=crop_pct,
                      interpolation=interpolation, run="tests/views", step=0)
    model = timm.create_model("test_resnet", pretrained=False, num_classes=10,
                              pretrained_cfg_overlay=meta["pretrained_cfg"])
    cfg = timm.data.resolve_data_config({}, model=model)
    assert cfg["crop_pct"] == crop_pct and cfg["interpolation"] == interpolation
    theirs = timm.data.create_transform(**cfg)(Image.open(io.BytesIO(data)).convert("RGB"))
    assert ours.shape == theirs.shape == (3, size, size)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("mode", ["L", "CMYK", "RGB"])
def test_grey_and_cmyk_jpegs_make_rgb_crops(mode):
    """Grey, CMYK and RGB JPEGs all give an RGB crop whose colours follow the picture (as PIL's own
    conversion to RGB renders it)."""
    buf = io.BytesIO()
    photo = Image.open(io.BytesIO(_photo("PNG"))).convert(mode)
    photo.save(buf, format="JPEG", quality=95)
    views = Views(64, crop="random_resized", crop_scale=(1.0, 1.0), crop_ratio=(4 / 3, 4 / 3), interpolation="bicubic")
    crop = np.asarray(views.base(buf.getvalue(), random.Random(0)), dtype=np.float32)
    want = np.asarray(photo.convert("RGB").resize((64, 64), Image.BICUBIC), dtype=np.float32)
    assert crop.shape == (64, 64, 3) and np.abs(crop - want).mean() < 6
