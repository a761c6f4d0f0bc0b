#!/usr/bin/env python
"""Build WebDataset shard sets from a folder of images.

  python tools/make_shards.py SRC DST [--labels-per-class N] [--seed S] [--max-count K] [--unlabeled]

SRC holds class subfolders (SRC/<class>/*.png), or any images with --unlabeled. With
--labels-per-class N, DST gets DST/labeled (N per class, stratified, seeded) and DST/unlabeled (the
rest; true labels only in the json metadata). Corrupt images are skipped, counted and listed.
"""
import argparse
import sys

from distssl.data.io import redact
from distssl.shards import make_shards


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="folder (or fsspec URL) of images: SRC/<class>/*.png, or any images with --unlabeled")
    p.add_argument("dst", help="output shard-set folder (or fsspec URL)")
    p.add_argument("--labels-per-class", type=int, default=None,
                   help="split into DST/labeled (N per class) and DST/unlabeled (the rest)")
    p.add_argument("--unlabeled", action="store_true", help="SRC is a flat folder of images without classes")
    p.add_argument("--seed", type=int, default=0, help="seed of the label split and shard shuffle (default 0)")
    p.add_argument("--max-count", type=int, default=1000, help="images per shard (default 1000)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    a = p.parse_args(argv)
    try:
        sets = make_shards(a.src, a.dst, labels_per_class=a.labels_per_class, unlabeled=a.unlabeled,
                           seed=a.seed, max_count=a.max_count, progress=not a.quiet)
    except (FileNotFoundError, ValueError) as e:
        print(f"make_shards: error: {e}", file=sys.stderr)
        return 2
    for name, idx in sets.items():
        where = redact(a.dst.rstrip("/") + (f"/{name}" if name else ""))
        print(f"{where}: {idx['count']} images in {len(idx['shards'])} shards, "
              f"{idx['num_failures']} failed inputs skipped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
