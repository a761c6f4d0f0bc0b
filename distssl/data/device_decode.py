"""``data.decode_on=device``: JPEGs leave the loader undecoded and are decoded batched on the device.

Loader side (``encoded_base``): the JPEG header gives the image's size, and the sample's crop box is
drawn from its ``random.Random`` exactly as ``Views.base`` draws it (a random-resized box, or the
centred square that ``crop=pad`` resizes), so every later draw (the view plans) is the one the loader
path makes: the same seed gives the same choices, and exact and elastic resume hold. The sample carries
``bytes_image`` (the file's bytes), ``box`` (left, top, width, height in the file's pixels) and
``decoded`` False. An image that is not a JPEG (PNG, WebP...) is decoded and cropped in the loader as
before and travels as its base's pixels with ``decoded`` True, so a batch may mix the two.

Device side (``decode_batch``): TorchCodec's batched ``decode_jpeg`` (nvJPEG on a GPU in one call for the
batch; on the CPU libjpeg-turbo, one by one; torchvision 0.29 deprecated its own image decoding for it), then
per image the box's pixels resized to the view size with antialiasing, as the loader path resizes them. The
loader path decodes a large JPEG at a reduced DCT scale first (PIL's draft), nvJPEG at full scale, so pixels
agree up to that rounding (tests/test_device_decode.py states the tolerance). A JPEG the device cannot decode
is tried with PIL on the CPU; one that neither decodes is replaced by another sample of the batch and counted
as skipped.
"""
from __future__ import annotations

import io
import random
from typing import Optional

import torch
import torch.nn.functional as F
from PIL import Image

from distssl.data.transforms import random_resized_box, to_uint8
from distssl.errors import require

JPEG_MAGIC = b"\xff\xd8\xff"


def jpeg_size(data: bytes) -> Optional[tuple[int, int]]:
    """(width, height) from a JPEG's header without decoding it; None for anything else."""
    if not data.startswith(JPEG_MAGIC):
        return None
    try:
        img = Image.open(io.BytesIO(data))
        return img.size if img.format == "JPEG" and img.mode in ("RGB", "L", "YCbCr") else None
    except Exception:
        return None  # the loader path decides: it decodes it, or the sample is skipped and counted


def crop_box(views, width: int, height: int, rng: random.Random) -> tuple[int, int, int, int]:
    """The base's box in the file's pixels, drawn as ``Views.base`` draws it (crop=pad draws nothing)."""
    if views.crop == "random_resized":
        return random_resized_box(width, height, views.crop_scale, views.crop_ratio, rng)
    side = min(width, height)  # crop=pad: the shorter side resized to the view, centre-cropped
    return (width - side) // 2, (height - side) // 2, side, side


def encoded_base(views, data: bytes, rng: random.Random) -> dict:
    """A sample's base, undecoded when it is a JPEG (see the module's docstring)."""
    size = jpeg_size(data)
    if size is None:
        img = views.base(data, rng)  # raises on an undecodable image: the caller counts it
        pixels = to_uint8(img)
        return {"bytes_image": pixels.reshape(-1), "box": torch.tensor([0, 0, *pixels.shape[1:][::-1]]),
                "decoded": True}
    return {"bytes_image": torch.frombuffer(bytearray(data), dtype=torch.uint8),
            "box": torch.tensor(crop_box(views, *size, rng)), "decoded": False}


def _resize(crop: torch.Tensor, size: int, interpolation: str) -> torch.Tensor:
    """CHW uint8 -> 3 x size x size uint8, antialiased (uint8 kernels on the CPU, float on a GPU)."""
    if crop.shape[1:] == (size, size):
        return crop
    x = crop[None]
    if x.device.type == "cpu":
        return F.interpolate(x, size=(size, size), mode=interpolation, antialias=True)[0]
    out = F.interpolate(x.float(), size=(size, size), mode=interpolation, antialias=True)
    return out.round_().clamp_(0, 255).to(torch.uint8)[0]


def _decode_one_on_cpu(data: torch.Tensor) -> Optional[torch.Tensor]:
    try:
        return to_uint8(Image.open(io.BytesIO(data.numpy().tobytes())).convert("RGB"))
    except Exception:
        return None


def decode_batch(flat: torch.Tensor, lengths: torch.Tensor, decoded: torch.Tensor, boxes: torch.Tensor,
                 size: int, interpolation: str, device: torch.device) -> tuple[torch.Tensor, int]:
    """(the batch's bases, N x 3 x size x size uint8 on ``device``; how many samples could not be decoded
    and were replaced by another of the batch)."""
    decode_jpeg = require("torchcodec.decoders", "decode", "data.decode_on=device").decode_jpeg
    chunks = flat.split(lengths.tolist())
    n = len(chunks)
    out = torch.empty((n, 3, size, size), dtype=torch.uint8, device=device)
    jpegs = [i for i in range(n) if not bool(decoded[i])]
    for i in range(n):
        if bool(decoded[i]):
            out[i] = chunks[i].view(3, size, size).to(device, non_blocking=True)
    images: list[Optional[torch.Tensor]] = []
    if jpegs:
        try:
            images = decode_jpeg([chunks[i] for i in jpegs], mode="RGB", device=device)
        except RuntimeError:  # one bad file fails the batched call: each on its own, then PIL
            images = []
            for i in jpegs:
                try:
                    images.append(decode_jpeg(chunks[i], mode="RGB", device=device))
                except RuntimeError:
                    img = _decode_one_on_cpu(chunks[i])
                    images.append(None if img is None else img.to(device))
    bad = []
    for i, img in zip(jpegs, images):
        if img is None:
            bad.append(i)
            continue
        left, top, w, h = (int(v) for v in boxes[i])
        x0, y0 = min(left, img.shape[2] - 1), min(top, img.shape[1] - 1)
        crop = img[:, y0:max(y0 + 1, min(img.shape[1], top + h)), x0:max(x0 + 1, min(img.shape[2], left + w))]
        out[i] = _resize(crop, size, interpolation)
    good = [i for i in range(n) if i not in set(bad)]
    for j, i in enumerate(bad):  # keep the batch's shape (micro-batches and accumulation rely on it)
        out[i] = out[good[j % len(good)]] if good else 127  # a batch of nothing but bad files: grey
    return out, len(bad)
