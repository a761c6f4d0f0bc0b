#!/usr/bin/env python
"""Shard builder throughput against this machine's limit for the same work.

The limit is one tight loop of read + decode + resize + encode per core, times the number of
workers; the builder does the same work plus listing, tar writing and publishing. Both run here, in
one process tree, one after the other, on the same real images (MNIST digits upscaled to JPEGs).

  python tools/bench/shards.py [--quick] [--count N] [--workers W] [--s3]

Ends with: RESULT builder_img_s=... limit_img_s=... builder_vs_limit=... [s3_builder_img_s=... s3_vs_limit=...]
"""
import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from common import machine, real_images, result, s3_server, table, upload_folder


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small run (under a minute)")
    p.add_argument("--count", type=int, help="images (default 3000, 400 with --quick)")
    p.add_argument("--size", type=int, default=320, help="source image side in pixels (default 320)")
    p.add_argument("--max-size", type=int, default=160, help="resize target, shorter side (default 160)")
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="builder processes (default: cores)")
    p.add_argument("--s3", action="store_true", help="also build from and to a local S3 server (moto)")
    a = p.parse_args(argv)
    count = a.count or (400 if a.quick else 3000)

    from distssl.shards import BuildOptions, ImageOptions, make_shards
    from distssl.shards.images import process_image
    from distssl.storage import store

    tmp = Path(tempfile.mkdtemp(prefix="bench-shards-"))
    paths = real_images(tmp / "raw", count, a.size)
    img_opts = ImageOptions(max_size=a.max_size, format="jpg", quality=90)
    n_limit = min(count, 300 if a.quick else 1000)
    t = time.perf_counter()
    for path in paths[:n_limit]:
        process_image(store.read_bytes(str(path)), img_opts)
    per_core = n_limit / (time.perf_counter() - t)
    limit = per_core * a.workers
    per_shard = max(25, count // (4 * a.workers))  # enough shards to keep every worker busy
    opts = BuildOptions(unlabeled=True, max_count=per_shard, image=img_opts, workers=a.workers, progress=False)
    t = time.perf_counter()
    make_shards(str(tmp / "raw"), str(tmp / "out"), opts)
    builder = count / (time.perf_counter() - t)
    rows = [("decode+resize+encode loop, 1 core", f"{per_core:.0f}", "1.00 (per core)"),
            (f"limit: loop x {a.workers} workers", f"{limit:.0f}", "1.00"),
            (f"make_shards local, {a.workers} workers", f"{builder:.0f}", f"{builder / limit:.2f}")]
    extra = {}
    if a.s3:
        with s3_server():
            upload_folder(tmp / "raw", "bench-raw")
            import boto3
            boto3.client("s3").create_bucket(Bucket="bench-shards")
            t = time.perf_counter()
            make_shards("s3://bench-raw", "s3://bench-shards/set", opts)
            s3_rate = count / (time.perf_counter() - t)
        rows.append((f"make_shards s3->s3, {a.workers} workers", f"{s3_rate:.0f}", f"{s3_rate / limit:.2f}"))
        extra = {"s3_builder_img_s": s3_rate, "s3_vs_limit": s3_rate / limit}
    print(f"machine: {machine()}; {count} JPEGs {a.size}px -> shorter side {a.max_size}px, jpg q90")
    table(rows, ("what", "img/s", "vs limit"))
    result(builder_img_s=builder, limit_img_s=limit, builder_vs_limit=builder / limit, **extra)
    return 0


if __name__ == "__main__":
    sys.exit(main())
