"""One image in, the bytes to store out: decoded once to verify, resized and re-encoded only if asked."""
from __future__ import annotations

import io
import re
import warnings
from dataclasses import dataclass
from typing import Optional

from PIL import Image

ACCEPTED = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp"}
PIL_FORMAT = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}
_OBJECT_REPR = re.compile(r"<[^<>]* at 0x[0-9a-f]+>")  # keeps failure reasons identical across reruns
MAX_PIXELS = 178_956_970  # PIL's default bomb limit x2: beyond it an image is refused, not decoded


@dataclass(frozen=True)
class ImageOptions:
    max_size: Optional[int] = None  # shorter side at most this many pixels
    format: Optional[str] = None  # jpg | webp | png; None keeps accepted originals
    quality: int = 90


def process_image(data: bytes, opts: ImageOptions) -> tuple[Optional[bytes], Optional[str], Optional[str]]:
    """(payload, extension, None) for a good image, (None, None, reason) for a bad one."""
    if not data:
        return None, None, "empty file"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            src_fmt = img.format
            if img.width * img.height > MAX_PIXELS:
                return None, None, f"decompression bomb: {img.width}x{img.height} pixels"
            resize = opts.max_size is not None and min(img.size) > opts.max_size
            if resize and src_fmt == "JPEG":
                scale = opts.max_size / min(img.size)
                img.draft(img.mode, (int(img.width * scale) + 1, int(img.height * scale) + 1))
            img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        return None, None, f"decompression bomb: {e}"
    except Exception as e:  # PIL raises many types for truncated / non-image data
        return None, None, f"undecodable: {type(e).__name__}: {_OBJECT_REPR.sub('data', str(e))}"
    if img.width < 1 or img.height < 1:
        return None, None, "zero-size image"
    out_ext = opts.format or ACCEPTED.get(src_fmt, "png")
    if not resize and ACCEPTED.get(src_fmt) == out_ext:
        return data, out_ext, None  # the original, byte for byte
    if resize:
        scale = opts.max_size / min(img.size)
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.BICUBIC)
    if out_ext == "jpg" and img.mode not in ("RGB", "L"):
        img = img.convert("RGB")
    elif img.mode not in ("RGB", "RGBA", "L", "LA"):
        img = img.convert("RGBA" if "A" in img.getbands() or "transparency" in img.info else "RGB")
    buf = io.BytesIO()
    kwargs = {"quality": opts.quality} if out_ext in ("jpg", "webp") else {}
    img.save(buf, format=PIL_FORMAT[out_ext], **kwargs)
    return buf.getvalue(), out_ext, None
