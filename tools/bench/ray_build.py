#!/usr/bin/env python
"""make_shards on a Ray cluster: images per second with 1 node and with 2 nodes, same job, one run.

A local Ray cluster (ray.cluster_utils.Cluster: every node its own raylet and CPU budget) on this
machine builds photo-like JPEGs (500x375, from scikit-learn's two photos) resized to --max-size
from an S3-protocol server (moto) into it, first with one node of --cpus-per-node CPUs, then with
a second node added. On one machine both nodes share its cores, and moto serves every read and
write from one process: the ratio shows that the build spreads over the nodes it is given, not what
a cluster of separate machines would reach.

  python tools/bench/ray_build.py [--quick] [--count N] [--cpus-per-node C]

Both stores run: local folders (the build's own work, CPU-bound) and S3 (moto) to S3.

Ends with: RESULT local_one_node_img_s=... local_two_vs_one=... s3_one_node_img_s=... s3_two_vs_one=...
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

from common import machine, photo_jpegs, result, s3_server, table, upload_folder


def _build(address: str, src: str, dst: str, count: int, per_shard: int, max_size: int) -> float:
    from distssl.shards import BuildOptions, ImageOptions, make_shards

    opts = BuildOptions(unlabeled=True, max_count=per_shard, ray_address=address, progress=False,
                        image=ImageOptions(max_size=max_size, format="jpg", quality=90))
    t = time.perf_counter()
    index = make_shards(src, dst, opts)[""]
    elapsed = time.perf_counter() - t
    assert index["count"] == count, index["count"]
    return count / elapsed


def _one_then_two(a, raw: str, warm: str, out: str, count: int, per_shard: int) -> tuple[float, float]:
    """The same build on a one-node cluster, then with a second node added; each cluster first builds
    a small warm-up set so that its worker processes are started before the clock runs."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": a.cpus_per_node, "include_dashboard": False})
    try:
        cluster.wait_for_nodes()
        _build(cluster.address, warm, f"{out}/warm1", 24, 2, a.max_size)
        one = _build(cluster.address, raw, f"{out}/one", count, per_shard, a.max_size)
        cluster.add_node(num_cpus=a.cpus_per_node)
        cluster.wait_for_nodes()
        _build(cluster.address, warm, f"{out}/warm2", 24, 2, a.max_size)
        two = _build(cluster.address, raw, f"{out}/two", count, per_shard, a.max_size)
    finally:
        cluster.shutdown()
    return one, two


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small run (about a minute)")
    p.add_argument("--count", type=int, help="images (default 1200, 240 with --quick)")
    p.add_argument("--cpus-per-node", type=int, default=1, help="CPUs each Ray node offers (default 1)")
    p.add_argument("--max-size", type=int, default=160, help="resize target, shorter side (default 160)")
    a = p.parse_args(argv)
    count = a.count or (240 if a.quick else 1200)
    per_shard = max(10, count // 24)  # enough shards to keep both nodes busy to the end

    tmp = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    photo_jpegs(tmp / "raw", count)
    warm = tmp / "warm"
    for path in sorted((tmp / "raw").rglob("*.jpg"))[:24]:
        (warm / path.parent.name).mkdir(parents=True, exist_ok=True)
        (warm / path.parent.name / path.name).write_bytes(path.read_bytes())
    rows, out = [], {}
    for store in ("local", "s3"):
        if store == "s3":
            with s3_server():
                upload_folder(tmp / "raw", "bench-ray-raw")
                upload_folder(warm, "bench-ray-warm")
                upload_folder(warm, "bench-ray-out", prefix="warm/")
                one, two = _one_then_two(a, "s3://bench-ray-raw", "s3://bench-ray-warm", "s3://bench-ray-out",
                                         count, per_shard)
        else:
            one, two = _one_then_two(a, str(tmp / "raw"), str(warm), str(tmp / "out"), count, per_shard)
        rows += [(store, "1 Ray node", f"{one:.0f}", "1.00"), (store, "2 Ray nodes", f"{two:.0f}", f"{two / one:.2f}")]
        out.update({f"{store}_one_node_img_s": one, f"{store}_two_nodes_img_s": two, f"{store}_two_vs_one": two / one})
    print(f"# {machine()}; {count} photo JPEGs 500x375 -> shorter side {a.max_size}, {per_shard} per shard, "
          f"{a.cpus_per_node} CPU per Ray node; s3 = moto on this machine, source and destination")
    table(rows, ("store", "cluster", "img/s", "vs 1 node"))
    result(**out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
