"""Weak, strong (RandAugment + Cutout) and eval views, as pure functions of (image, rng).

Every random choice comes from a ``random.Random`` passed in, seeded per sample by the stream,
so a resumed run draws exactly the augmentations an uninterrupted one would. Views leave the
loader as uint8 CHW tensors (4x less to move than float); normalisation happens on the device.
The RandAugment pool and magnitudes follow the FixMatch reference implementation
(random magnitude in [1, 10) per op, each op applied with probability 0.5, then Cutout).
"""
from __future__ import annotations

import io
import random
from typing import Callable

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps

FILL = (127, 127, 127)


def decode(data: bytes, size: int) -> Image.Image:
    """Bytes -> RGB image whose shorter side is ``size``, centre-cropped to size x size."""
    img = Image.open(io.BytesIO(data))
    if img.format == "JPEG":
        img.draft("RGB", (size, size))  # decode at reduced scale when the file allows it
    img = img.convert("RGB")
    w, h = img.size
    if (w, h) != (size, size):
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        img = img.resize((nw, nh), Image.BILINEAR)
        left, top = (nw - size) // 2, (nh - size) // 2
        img = img.crop((left, top, left + size, top + size))
    return img


def to_uint8(img) -> torch.Tensor:
    """PIL image or HWC uint8 array -> CHW uint8 tensor, in one copy."""
    arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


def _reflect(idx: np.ndarray, n: int) -> np.ndarray:
    """Indices reflected into [0, n) without repeating the edge (numpy's "reflect" padding)."""
    period = 2 * (n - 1)
    idx = np.abs(idx) % period if period else np.zeros_like(idx)
    return np.where(idx >= n, period - idx, idx)


def flip_and_crop_array(img: Image.Image, rng: random.Random, flip: bool, pad_fraction: float) -> np.ndarray:
    """The weak view as an HWC array: optional horizontal flip, then a random crop of the image
    reflect-padded by pad_fraction. The crop is gathered by reflected indices (one copy), not by
    padding first: np.pad was a fifth of a whole two-view sample's time."""
    arr = np.asarray(img)
    if flip and rng.random() < 0.5:
        arr = arr[:, ::-1]
    h, w = arr.shape[:2]
    pad = int(round(pad_fraction * w))
    if pad <= 0:
        return np.ascontiguousarray(arr)
    x, y = rng.randint(0, 2 * pad), rng.randint(0, 2 * pad)
    rows = _reflect(np.arange(y - pad, y - pad + h), h)
    cols = _reflect(np.arange(x - pad, x - pad + w), w)
    return arr.take(rows, axis=0).take(cols, axis=1)  # two 1-d gathers: 6x faster than 2-d fancy indexing


def flip_and_crop(img: Image.Image, rng: random.Random, flip: bool, pad_fraction: float) -> Image.Image:
    """The weak view as a PIL image (the strong view's RandAugment works on PIL)."""
    return Image.fromarray(flip_and_crop_array(img, rng, flip, pad_fraction))


# --- FixMatch's RandAugment pool: op(img, v, max_v, bias, rng), v in [1, 10) ---------------------

def _f(v: float, max_v: float) -> float:
    return float(v) * max_v / 10


def _signed(x: float, rng: random.Random) -> float:
    return -x if rng.random() < 0.5 else x


def _affine(img, coeffs):
    return img.transform(img.size, Image.AFFINE, coeffs, fillcolor=FILL)


POOL: list[tuple[Callable, float, float]] = [
    (lambda img, v, rng: ImageOps.autocontrast(img), 0, 0),
    (lambda img, v, rng: ImageEnhance.Brightness(img).enhance(v), 0.9, 0.05),
    (lambda img, v, rng: ImageEnhance.Color(img).enhance(v), 0.9, 0.05),
    (lambda img, v, rng: ImageEnhance.Contrast(img).enhance(v), 0.9, 0.05),
    (lambda img, v, rng: ImageOps.equalize(img), 0, 0),
    (lambda img, v, rng: img, 0, 0),
    (lambda img, v, rng: ImageOps.posterize(img, int(v)), 4, 4),
    (lambda img, v, rng: img.rotate(_signed(int(v), rng), fillcolor=FILL), 30, 0),
    (lambda img, v, rng: ImageEnhance.Sharpness(img).enhance(v), 0.9, 0.05),
    (lambda img, v, rng: _affine(img, (1, _signed(v, rng), 0, 0, 1, 0)), 0.3, 0),
    (lambda img, v, rng: _affine(img, (1, 0, 0, _signed(v, rng), 1, 0)), 0.3, 0),
    (lambda img, v, rng: ImageOps.solarize(img, 256 - int(v)), 256, 0),
    (lambda img, v, rng: _affine(img, (1, 0, int(_signed(v, rng) * img.size[0]), 0, 1, 0)), 0.3, 0),
    (lambda img, v, rng: _affine(img, (1, 0, 0, 0, 1, int(_signed(v, rng) * img.size[1]))), 0.3, 0),
]


def randaugment(img: Image.Image, rng: random.Random, num_ops: int = 2) -> Image.Image:
    for op, max_v, bias in rng.choices(POOL, k=num_ops):
        v = rng.randint(1, 9)
        if rng.random() < 0.5:
            img = op(img, _f(v, max_v) + bias, rng)
    return img


def cutout(img: Image.Image, rng: random.Random, fraction: float) -> Image.Image:
    """Grey out a square of side ``fraction`` x width centred at a random point (clipped)."""
    side = int(fraction * img.size[0])
    if side <= 0:
        return img
    w, h = img.size
    x0, y0 = rng.uniform(0, w), rng.uniform(0, h)
    box = (int(max(0, x0 - side / 2)), int(max(0, y0 - side / 2)),
           int(min(w, x0 + side / 2)), int(min(h, y0 + side / 2)))
    img = img.copy()
    img.paste(FILL, box)
    return img


class Views:
    """The three views of the recipe, built from one data config."""

    def __init__(self, image_size: int, flip: bool, pad_fraction: float, randaugment_ops: int,
                 cutout_fraction: float):
        self.image_size, self.flip, self.pad_fraction = image_size, flip, pad_fraction
        self.randaugment_ops, self.cutout_fraction = randaugment_ops, cutout_fraction

    @classmethod
    def from_config(cls, data_cfg) -> "Views":
        return cls(data_cfg.image_size, data_cfg.flip, data_cfg.pad_fraction, data_cfg.randaugment_ops,
                   data_cfg.cutout_fraction)

    def weak(self, img: Image.Image, rng: random.Random) -> torch.Tensor:
        return to_uint8(flip_and_crop_array(img, rng, self.flip, self.pad_fraction))

    def strong(self, img: Image.Image, rng: random.Random) -> torch.Tensor:
        img = flip_and_crop(img, rng, self.flip, self.pad_fraction)
        img = randaugment(img, rng, self.randaugment_ops)
        return to_uint8(cutout(img, rng, self.cutout_fraction))

    def eval(self, img: Image.Image) -> torch.Tensor:
        return to_uint8(img)


def normalize(batch_uint8: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 NCHW -> normalised float, on whatever device the batch is on."""
    return (batch_uint8.float().div_(255.0) - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
