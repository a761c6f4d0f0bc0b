"""``data.augment_on=device``: loader workers only decode and crop; the views are made batched on the
training device.

Each sample's random choices are still drawn on the loader from the sample's own ``random.Random``
(seeded from its position, so a resume stays exact), in exactly the order the loader path draws
them (``Views.weak`` / ``Views.strong``), and shipped as a small float vector, the *plan*:

    weak:   [flip, pad_x, pad_y]
    strong: [flip, pad_x, pad_y, (op, value, applied, sign) x randaugment_ops, cutout_x, cutout_y]

``apply_weak`` / ``apply_strong`` then run the same flip, reflect-padded crop, RandAugment pool
(FixMatch's, with PIL's formulas: ITU-R 601 grey, SMOOTH kernel, nearest-neighbour affine maps with
grey fill) and Cutout on a uint8 NCHW batch: one batched call per op of the pool, not one per
sample. The weak view is pixel-identical to the loader path; the strong view matches it up to
PIL's rounding (tests/test_device_augment.py).
"""
from __future__ import annotations

import math
import random

import torch
import torch.nn.functional as F

from distssl.data.transforms import FILL, POOL

GREY = FILL[0]
# indices into transforms.POOL (the order of FixMatch's pool)
AUTOCONTRAST, BRIGHTNESS, COLOR, CONTRAST, EQUALIZE, IDENTITY, POSTERIZE, ROTATE, SHARPNESS, SHEAR_X, SHEAR_Y, \
    SOLARIZE, TRANSLATE_X, TRANSLATE_Y = range(14)
SIGNED = {ROTATE, SHEAR_X, SHEAR_Y, TRANSLATE_X, TRANSLATE_Y}  # ops that draw a sign when applied


# --- plans: drawn on the loader, in the loader path's order ----------------------------------------

def _flip_and_pad(rng: random.Random, flip: bool, pad: int) -> list[float]:
    flipped = 1.0 if flip and rng.random() < 0.5 else 0.0
    if pad <= 0:
        return [flipped, float(pad), float(pad)]
    return [flipped, float(rng.randint(0, 2 * pad)), float(rng.randint(0, 2 * pad))]


def pad_pixels(views) -> int:
    return int(round(views.view_pad * views.image_size))


def weak_plan(views, rng: random.Random) -> list[float]:
    return _flip_and_pad(rng, views.flip, pad_pixels(views))


def strong_plan(views, rng: random.Random) -> list[float]:
    plan = _flip_and_pad(rng, views.flip, pad_pixels(views))
    pool = list(range(len(POOL)))
    for op in rng.choices(pool, k=views.randaugment_ops):
        v = rng.randint(1, 9)
        applied = rng.random() < 0.5
        sign = -1.0 if applied and op in SIGNED and rng.random() < 0.5 else 1.0
        _, max_v, bias = POOL[op]
        plan += [float(op), float(v) * max_v / 10 + bias, float(applied), sign]
    side = int(views.cutout_fraction * views.image_size)
    if side > 0:
        plan += [rng.uniform(0, views.image_size), rng.uniform(0, views.image_size)]
    else:
        plan += [-1.0, -1.0]
    return plan


# --- application: batched, on uint8 NCHW ----------------------------------------------------------

def _reflect(idx: torch.Tensor, n: int) -> torch.Tensor:
    period = 2 * (n - 1)
    idx = idx.abs() % period if period else torch.zeros_like(idx)
    return torch.where(idx >= n, period - idx, idx)


def flip_and_crop(x: torch.Tensor, plan: torch.Tensor, pad: int) -> torch.Tensor:
    """Per-sample horizontal flip, then a crop of the image reflect-padded by ``pad`` (one gather)."""
    n, c, h, w = x.shape
    flipped = plan[:, 0] > 0.5
    x = torch.where(flipped[:, None, None, None], x.flip(3), x)
    if pad <= 0:
        return x
    ox, oy = plan[:, 1].long() - pad, plan[:, 2].long() - pad
    rows = _reflect(oy[:, None] + torch.arange(h, device=x.device), h)  # (n, h)
    cols = _reflect(ox[:, None] + torch.arange(w, device=x.device), w)  # (n, w)
    flat = (rows[:, :, None] * w + cols[:, None, :]).view(n, 1, h * w).expand(n, c, h * w)
    return x.flatten(2).gather(2, flat).view(n, c, h, w)


def _blend(degenerate: torch.Tensor, img: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL's Image.blend: degenerate + factor * (img - degenerate), truncated to uint8."""
    out = degenerate.float() + factor.view(-1, 1, 1, 1) * (img.float() - degenerate.float())
    return out.clamp_(0, 255).to(torch.uint8)


def _grey(img: torch.Tensor) -> torch.Tensor:
    """PIL's RGB -> L: (19595 R + 38470 G + 7471 B + 0x8000) >> 16."""
    i = img.int()
    return ((19595 * i[:, 0] + 38470 * i[:, 1] + 7471 * i[:, 2] + 0x8000) >> 16)[:, None]


def _smooth(img: torch.Tensor) -> torch.Tensor:
    """PIL's SMOOTH filter (3x3, centre 5, the rest 1, /13); the one-pixel border is kept."""
    k = torch.ones(3, 3, device=img.device)
    k[1, 1] = 5
    k = (k / 13).expand(img.shape[1], 1, 3, 3)
    inner = F.conv2d(img.float(), k, groups=img.shape[1]).round_().clamp_(0, 255).to(torch.uint8)
    out = img.clone()
    out[:, :, 1:-1, 1:-1] = inner
    return out


def _affine(img: torch.Tensor, coeffs: torch.Tensor) -> torch.Tensor:
    """PIL's AFFINE transform, nearest neighbour, grey fill: output pixel (x, y) takes input
    (a x + b y + c, d x + e y + f) at pixel centres. ``coeffs`` is (n, 6)."""
    n, c, h, w = img.shape
    ys, xs = torch.meshgrid(torch.arange(h, device=img.device, dtype=torch.float64) + 0.5,
                            torch.arange(w, device=img.device, dtype=torch.float64) + 0.5, indexing="ij")
    a, b, cc, d, e, f = (coeffs[:, i, None, None].double() for i in range(6))
    xin, yin = torch.floor(a * xs + b * ys + cc).long(), torch.floor(d * xs + e * ys + f).long()
    inside = (xin >= 0) & (xin < w) & (yin >= 0) & (yin < h)
    flat = (yin.clamp(0, h - 1) * w + xin.clamp(0, w - 1)).view(n, 1, h * w).expand(n, c, h * w)
    out = img.flatten(2).gather(2, flat).view(n, c, h, w)
    return torch.where(inside[:, None], out, torch.full_like(out, GREY))


def _rotation(degrees: torch.Tensor, w: int, h: int) -> torch.Tensor:
    """PIL's Image.rotate matrix about the centre, for each angle."""
    rad = -torch.deg2rad(degrees.double())
    cos, sin = torch.cos(rad), torch.sin(rad)
    cx, cy = w / 2, h / 2
    return torch.stack([cos, sin, cos * -cx + sin * -cy + cx, -sin, cos, -sin * -cx + cos * -cy + cy], 1)


def _apply_op(op: int, img: torch.Tensor, value: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    n, _, h, w = img.shape
    if op == AUTOCONTRAST:
        from torchvision.transforms.v2.functional import autocontrast
        return autocontrast(img)
    if op == EQUALIZE:
        from torchvision.transforms.v2.functional import equalize
        return equalize(img)
    if op == IDENTITY:
        return img
    if op == BRIGHTNESS:
        return _blend(torch.zeros_like(img), img, value)
    if op == COLOR:
        return _blend(_grey(img).expand_as(img), img, value)
    if op == CONTRAST:
        mean = torch.floor(_grey(img).float().mean(dim=(1, 2, 3)) + 0.5)
        return _blend(mean.view(n, 1, 1, 1).expand_as(img), img, value)
    if op == SHARPNESS:
        return _blend(_smooth(img), img, value)
    if op == POSTERIZE:
        bits = value.long()
        mask = (255 - ((1 << (8 - bits)) - 1)).to(torch.uint8)
        return img & mask.view(n, 1, 1, 1)
    if op == SOLARIZE:
        threshold = (256 - value.long()).view(n, 1, 1, 1)
        return torch.where(img.long() < threshold, img, 255 - img)
    one, zero = torch.ones_like(value, dtype=torch.float64), torch.zeros_like(value, dtype=torch.float64)
    signed = (value * sign).double()
    if op == ROTATE:
        coeffs = _rotation(signed.trunc(), w, h)
    elif op == SHEAR_X:
        coeffs = torch.stack([one, signed, zero, zero, one, zero], 1)
    elif op == SHEAR_Y:
        coeffs = torch.stack([one, zero, zero, signed, one, zero], 1)
    elif op == TRANSLATE_X:
        coeffs = torch.stack([one, zero, (signed * w).trunc(), zero, one, zero], 1)
    elif op == TRANSLATE_Y:
        coeffs = torch.stack([one, zero, zero, zero, one, (signed * h).trunc()], 1)
    else:  # pragma: no cover - the pool has 14 ops
        raise ValueError(f"unknown RandAugment op {op}")
    return _affine(img, coeffs)


def randaugment(x: torch.Tensor, ops: torch.Tensor) -> torch.Tensor:
    """``ops``: (n, k, 4) rows of (op, value, applied, sign); slot by slot, one batched call per op."""
    x = x.clone()
    for slot in range(ops.shape[1]):
        op, value, applied, sign = ops[:, slot].unbind(1)
        for kind in torch.unique(op[applied > 0.5]).tolist():
            idx = torch.nonzero((op == kind) & (applied > 0.5)).flatten()
            x[idx] = _apply_op(int(kind), x[idx], value[idx], sign[idx])
    return x


def cutout(x: torch.Tensor, centres: torch.Tensor, fraction: float) -> torch.Tensor:
    """A grey square of side fraction x width at each sample's centre (clipped), as transforms.cutout."""
    n, _, h, w = x.shape
    side = int(fraction * w)
    if side <= 0:
        return x
    cx, cy = centres[:, 0].double(), centres[:, 1].double()
    x0, y0 = (cx - side / 2).clamp(min=0).long(), (cy - side / 2).clamp(min=0).long()
    x1, y1 = (cx + side / 2).clamp(max=w).long(), (cy + side / 2).clamp(max=h).long()
    cols, rows = torch.arange(w, device=x.device), torch.arange(h, device=x.device)
    inside = ((cols >= x0[:, None]) & (cols < x1[:, None]))[:, None, :] & \
             ((rows >= y0[:, None]) & (rows < y1[:, None]))[:, :, None]
    return torch.where(inside[:, None], torch.full_like(x, GREY), x)


def apply_weak(base: torch.Tensor, plan: torch.Tensor, pad: int) -> torch.Tensor:
    return flip_and_crop(base, plan.to(base.device), pad)


def apply_strong(base: torch.Tensor, plan: torch.Tensor, pad: int, randaugment_ops: int,
                 cutout_fraction: float) -> torch.Tensor:
    plan = plan.to(base.device)
    x = flip_and_crop(base, plan[:, :3], pad)
    if randaugment_ops:
        x = randaugment(x, plan[:, 3:3 + 4 * randaugment_ops].view(-1, randaugment_ops, 4))
    return cutout(x, plan[:, -2:], cutout_fraction)


def plan_width(randaugment_ops: int) -> int:
    return 3 + 4 * randaugment_ops + 2


assert math.isclose(POOL[ROTATE][1], 30) and POOL[IDENTITY][1] == 0  # the index names follow POOL's order
