#!/usr/bin/env python
"""The shard builder's memory against the bucket's size: list and plan a synthetic bucket of 1M and 10M
keys (an fsspec filesystem that makes its listing up: 1,000 class folders, no files, no store), as
`distssl-shards SRC DST --labels-per-class 10 --eval-fraction 0.01 --dry-run` would, and report each
size's peak resident memory above the interpreter's own (each size in a fresh process).

  python tools/bench/listing.py [--quick] [--sizes 1000000,10000000] [--classes 1000]

The builder lists into hash-bucket files on local disk and plans a partition (--partition-keys keys) at a
time (distssl.shards.partitions, plan), so the peak follows the partition size, not the bucket's.
--quick: the same two sizes, listing and planning only (no build record serialised).
Ends with: RESULT peak_mb_1m=... peak_mb_10m=... bytes_per_key_10m=... growth_10m_vs_1m=...
(the goal of issue 32: the 10M peak at most 1.5x the 1M peak, and at most 1 GB).
"""
import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

from common import machine, result, table

ROOT = Path(__file__).resolve().parents[2]


def synthetic_filesystem(classes: int):
    """An fsspec filesystem ``synthbucket://N``: N keys ``class_CCCC/img_IIIIIIIII.jpg`` over ``classes``
    folders, each listed on demand (a folder's entries exist only while it is listed)."""
    from fsspec import AbstractFileSystem
    from fsspec.registry import register_implementation

    class SyntheticBucket(AbstractFileSystem):
        protocol = "synthbucket"

        @staticmethod
        def _total(path: str) -> int:
            return int(path.strip("/").split("/", 1)[0])

        def ls(self, path, detail=True, **kw):
            path = self._strip_protocol(path).strip("/")
            parts = path.split("/")
            n = self._total(path)
            if len(parts) == 1:
                entries = [{"name": f"{path}/class_{c:04d}", "size": 0, "type": "directory"} for c in range(classes)]
            else:
                c = int(parts[1].split("_")[1])
                per = n // classes + (c < n % classes)
                entries = [{"name": f"{path}/img_{c * (n // classes + 1) + i:09d}.jpg", "size": 110_000 + i % 997,
                            "type": "file"} for i in range(per)]
            return entries if detail else [e["name"] for e in entries]

        def info(self, path, **kw):
            path = self._strip_protocol(path).strip("/")
            if path.endswith(".jpg"):
                return {"name": path, "size": 110_000, "type": "file"}
            return {"name": path, "size": 0, "type": "directory"}

    register_implementation("synthbucket", SyntheticBucket, clobber=True)


def child(n: int, classes: int, quick: bool, partition_keys: int) -> dict:
    """One size, in this process: import, list, plan; peak RSS above the baseline after imports."""
    synthetic_filesystem(classes)
    import gzip
    import tempfile

    from distssl.shards.build import BuildOptions
    from distssl.shards.partitions import list_partitioned
    from distssl.shards.plan import Planner

    base_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-listing-") as work:
        listing = list_partitioned(f"synthbucket://{n}", f"{work}/listing", partition_keys)
        t_list = time.perf_counter() - t0
        opts = BuildOptions(labels_per_class=10, eval_fraction=0.01, max_count=1000)
        planner = Planner(listing, opts.split(), f"{work}/plan", lambda part, ids: [None] * len(ids))
        shards, record_bytes = 0, 0
        for part in planner.plan():  # each part as the build writes it to the record, then dropped
            shards += sum(len(p.shards) for p in part.sets.values())
            if not quick:
                record_bytes += len(gzip.compress(json.dumps(part.to_json(), separators=(",", ":")).encode()))
        t_plan = time.perf_counter() - t0 - t_list
        keys, partitions = len(listing), listing.partitions
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"keys": keys, "shards": shards, "partitions": partitions, "peak_mb": (peak_kb - base_kb) / 1024,
            "list_s": t_list, "plan_s": t_plan, "record_mb": record_bytes / 1e6}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="1000000,10000000", help="bucket sizes in keys (default 1M and 10M)")
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--quick", action="store_true", help="listing and planning only")
    p.add_argument("--partition-keys", type=int, default=500_000, help="the builder's --partition-keys (500000)")
    p.add_argument("--child", type=int, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        print(json.dumps(child(a.child, a.classes, a.quick, a.partition_keys)))
        return 0
    rows, res = [], {}
    for n in [int(s) for s in a.sizes.split(",")]:
        cmd = [sys.executable, __file__, "--child", str(n), "--classes", str(a.classes),
               "--partition-keys", str(a.partition_keys)] + (["--quick"] * a.quick)
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if r.returncode != 0:
            raise SystemExit(f"{n} keys failed:\n{r.stderr[-3000:]}")
        d = json.loads(r.stdout.strip().splitlines()[-1])
        label = f"{n // 1_000_000}m" if n >= 1_000_000 else f"{n // 1000}k"
        rows.append((f"{n:,}", d["partitions"], f"{d['peak_mb']:.0f}", f"{d['peak_mb'] * 2 ** 20 / n:.0f}",
                     f"{d['list_s']:.1f}", f"{d['plan_s']:.1f}", f"{d['record_mb']:.0f}" if not a.quick else "-",
                     d["shards"]))
        res[f"peak_mb_{label}"] = round(d["peak_mb"], 1)
        res[f"bytes_per_key_{label}"] = round(d["peak_mb"] * 2 ** 20 / n)
    print(f"# {machine()}; synthetic bucket, {a.classes} class folders, --labels-per-class 10 --eval-fraction 0.01")
    table(rows, ("keys", "partitions", "peak MB", "B/key", "list s", "plan s", "record MB (gz)", "shards"))
    if "peak_mb_1m" in res and "peak_mb_10m" in res:
        res["growth_10m_vs_1m"] = round(res["peak_mb_10m"] / max(res["peak_mb_1m"], 1e-9), 2)
    result(**res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
