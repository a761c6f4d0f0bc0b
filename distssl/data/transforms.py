"""Weak, strong (RandAugment + Cutout) and eval views, as pure functions of (image, rng).

Every random choice comes from a ``random.Random`` passed in, seeded per sample by the stream,
so a resumed run draws exactly the augmentations an uninterrupted one would. Views leave the
loader as uint8 CHW tensors (4x less to move than float); normalisation happens on the device.
The RandAugment pool and magnitudes follow the FixMatch reference implementation
(random magnitude in [1, 10) per op, each op applied with probability 0.5, then Cutout).
"""
from __future__ import annotations

import io
import math
import random
import warnings
from typing import Callable

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps

try:
    import simplejpeg
except ImportError:  # optional: PIL decodes the same JPEGs, a little slower
    simplejpeg = None

FILL = (127, 127, 127)
# PIL hands numpy a read-only buffer; the tensors made from it are only read (a copy per image
# would be waste), so torch's warning about writing to them does not apply
warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning,
                        module=__name__)


INTERPOLATION = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}


def _open(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data))


def _draft(img: Image.Image, need: tuple[int, int]) -> float:
    """Let a JPEG decode at 1/2, 1/4 or 1/8 scale (DCT scaling) while staying at least ``need``;
    returns the scale it will decode at (1.0 for other formats)."""
    if img.format != "JPEG":
        return 1.0
    w = img.size[0]
    img.draft("RGB", need)
    return img.size[0] / w


def _rgb_pixels(data: bytes, img: Image.Image, min_width: int, min_height: int) -> np.ndarray:
    """HWC uint8 RGB pixels, a JPEG decoded at the smallest DCT scale that keeps it at least
    min_width x min_height. simplejpeg (libjpeg-turbo, also PIL's decoder) when it is installed:
    the same pixels at full scale straight into numpy (no PIL image to copy out), and
    scales in eighths (3/8, 5/8...) rather than only halves; PIL otherwise, and for what
    libjpeg-turbo's strict mode refuses (recoverable corruption)."""
    if simplejpeg is not None and img.format == "JPEG":
        try:
            return simplejpeg.decode_jpeg(data, "RGB", min_width=min_width, min_height=min_height)
        except Exception:  # noqa: BLE001 - PIL decides: it decodes it, or the sample is skipped and counted
            pass
    _draft(img, (min_width, min_height))
    return np.asarray(img.convert("RGB"))


def decode(data: bytes, size: int, interpolation: str = "bilinear") -> Image.Image:
    """Bytes -> RGB image whose shorter side is ``size``, centre-cropped to size x size (the base of
    both views for ``data.crop=pad``: digits and CIFAR-sized images)."""
    img = _open(data)
    _draft(img, (size, size))
    img = img.convert("RGB")
    w, h = img.size
    if (w, h) != (size, size):
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        img = img.resize((nw, nh), INTERPOLATION[interpolation])
        left, top = (nw - size) // 2, (nh - size) // 2
        img = img.crop((left, top, left + size, top + size))
    return img


def random_resized_box(width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float],
                       rng: random.Random) -> tuple[int, int, int, int]:
    """(left, top, w, h) of an Inception-style crop: area in ``scale`` x the image's, aspect ratio
    log-uniform in ``ratio``; ten tries, then the central crop at the nearest allowed ratio
    (torchvision's RandomResizedCrop.get_params, drawn from ``rng``)."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, width - w), rng.randint(0, height - h), w, h
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def decode_random_resized(data: bytes, size: int, scale: tuple[float, float], ratio: tuple[float, float],
                          interpolation: str, rng: random.Random) -> Image.Image:
    """Bytes -> one Inception-style random crop resized to size x size (the base of both views for
    ``data.crop=random_resized``, as in FixMatch's ImageNet input). The box is drawn from the header's
    size before decoding, so a JPEG decodes at the smallest DCT scale that keeps the box at least
    ``size`` pixels, and only the box's pixels are resampled (PIL's resize with a box: no crop copy)."""
    img = _open(data)
    width, height = img.size
    left, top, w, h = random_resized_box(width, height, scale, ratio, rng)
    arr = _rgb_pixels(data, img, math.ceil(width * size / w), math.ceil(height * size / h))
    pixels = torch.from_numpy(arr).permute(2, 0, 1)[None]  # NCHW view of HWC
    fx, fy = pixels.shape[3] / width, pixels.shape[2] / height  # the decode's scale
    x0, y0 = int(left * fx), int(top * fy)
    x1 = max(x0 + 1, min(pixels.shape[3], round((left + w) * fx)))
    y1 = max(y0 + 1, min(pixels.shape[2], round((top + h) * fy)))
    # torch's antialiased uint8 resize (PIL's filters, vectorised) on the crop's pixels only; its
    # cost against PIL's resize: docs/benchmarks.md, ImageNet stream
    out = torch.nn.functional.interpolate(pixels[:, :, y0:y1, x0:x1], size=(size, size), mode=interpolation,
                                          antialias=True)
    return _planes_to_image(out[0])


def _planes_to_image(chw: torch.Tensor) -> Image.Image:
    """CHW uint8 -> RGB image, merging the three contiguous planes (fromarray of a strided HWC view
    would copy pixel by pixel)."""
    h, w = chw.shape[1:]
    return Image.merge("RGB", [Image.frombuffer("L", (w, h), chw[c].contiguous().numpy(), "raw", "L", 0, 1)
                               for c in range(3)])


def eval_size(size: int, crop_pct: float) -> int:
    """The shorter side before the centre crop: timm's floor(size / crop_pct)."""
    return math.floor(size / crop_pct)


def decode_eval(data: bytes, size: int, crop_pct: float, interpolation: str) -> Image.Image:
    """Bytes -> the eval input: shorter side resized to floor(size / crop_pct), centre crop of size,
    with torchvision's arithmetic, so timm's ``create_transform`` of the exported ``model.json``
    gives the same pixels (up to JPEG DCT-scaled decoding of large originals)."""
    img = _open(data)
    short = eval_size(size, crop_pct)
    w0, h0 = img.size
    _draft(img, (math.ceil(w0 * short / min(w0, h0)), math.ceil(h0 * short / min(w0, h0))))
    img = img.convert("RGB")
    w, h = img.size
    if min(w, h) != short:  # torchvision Resize(int): shorter side -> short, longer truncated
        nw, nh = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
        img = img.resize((nw, nh), INTERPOLATION[interpolation])
        w, h = nw, nh
    if (w, h) != (size, size):  # torchvision CenterCrop (pads when the image is smaller)
        if w < size or h < size:
            canvas = Image.new("RGB", (max(w, size), max(h, size)))
            canvas.paste(img, ((max(w, size) - w) // 2, (max(h, size) - h) // 2))
            img, w, h = canvas, canvas.size[0], canvas.size[1]
        top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
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
    return arr.take(rows, axis=0).take(cols, axis=1)  # two 1-d gathers, not one 2-d fancy index


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
    """The views of the recipe, built from one data config.

    ``crop="pad"`` (digits, CIFAR): the image is resized and centre-cropped to a square once, and each
    view takes its own flip and reflect-padded crop of it. ``crop="random_resized"`` (ImageNet): one
    Inception-style random crop per image is the base of both views (FixMatch's ImageNet input); each
    view flips it on its own, and the strong view adds RandAugment and Cutout. Eval is a centre crop
    of ``eval_crop_pct`` of the shorter side, as timm evaluates."""

    def __init__(self, image_size: int, flip: bool = True, pad_fraction: float = 0.125, randaugment_ops: int = 2,
                 cutout_fraction: float = 0.5, *, crop: str = "pad", crop_scale=(0.08, 1.0),
                 crop_ratio=(3 / 4, 4 / 3), interpolation: str = "bilinear", eval_crop_pct: float = 1.0):
        self.image_size, self.flip, self.pad_fraction = image_size, flip, pad_fraction
        self.randaugment_ops, self.cutout_fraction = randaugment_ops, cutout_fraction
        self.crop, self.crop_scale, self.crop_ratio = crop, tuple(crop_scale), tuple(crop_ratio)
        self.interpolation, self.eval_crop_pct = interpolation, eval_crop_pct
        # the pad crop belongs to crop=pad; a random-resized base is only flipped by the weak view
        self.view_pad = pad_fraction if crop == "pad" else 0.0

    @classmethod
    def from_config(cls, data_cfg) -> "Views":
        d = data_cfg
        return cls(d.image_size, d.flip, d.pad_fraction, d.randaugment_ops, d.cutout_fraction, crop=d.crop,
                   crop_scale=d.crop_scale, crop_ratio=d.crop_ratio, interpolation=d.interpolation or "bicubic",
                   eval_crop_pct=d.eval_crop_pct if d.eval_crop_pct is not None else 1.0)

    def base(self, data: bytes, rng: random.Random) -> Image.Image:
        """The decoded training image both views are made from (draws the random crop from ``rng``)."""
        if self.crop == "random_resized":
            return decode_random_resized(data, self.image_size, self.crop_scale, self.crop_ratio,
                                         self.interpolation, rng)
        return decode(data, self.image_size, self.interpolation)

    def eval_image(self, data: bytes) -> Image.Image:
        return decode_eval(data, self.image_size, self.eval_crop_pct, self.interpolation)

    def weak(self, img: Image.Image, rng: random.Random) -> torch.Tensor:
        return to_uint8(flip_and_crop_array(img, rng, self.flip, self.view_pad))

    def strong(self, img: Image.Image, rng: random.Random) -> torch.Tensor:
        img = flip_and_crop(img, rng, self.flip, self.view_pad)
        img = randaugment(img, rng, self.randaugment_ops)
        return to_uint8(cutout(img, rng, self.cutout_fraction))

    def eval(self, img: Image.Image) -> torch.Tensor:
        return to_uint8(img)


def normalize(batch_uint8: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 NCHW -> normalised float, on whatever device the batch is on."""
    return (batch_uint8.float().div_(255.0) - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
