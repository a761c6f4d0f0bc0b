#!/usr/bin/env python
"""What is in a shard set: counts, class histogram, bytes, failures; optionally verify or draw it.

  distssl-inspect URL [--verify] [--grid out.png] [--json]

URL is a shard-set folder or fsspec URL holding index.json (s3://bucket/shards/train/unlabeled, ...).
--verify reads every shard and decodes every image, and compares with the index.
"""
import argparse
import json
import sys

from distssl.cli import command
from distssl.data.index import read_index
from distssl.data.inspection import draw_grid, summarize, verify
from distssl.errors import UserError
from distssl.storage import store


@command
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("url", help="shard-set folder or URL with index.json")
    p.add_argument("--verify", action="store_true", help="decode every sample and check the counts")
    p.add_argument("--grid", metavar="PNG", help="write a picture of sample images with their labels")
    p.add_argument("--grid-count", type=int, default=64, help="images in the grid (default 64)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    a = p.parse_args(argv)

    try:
        index = read_index(a.url)
    except (FileNotFoundError, UserError) as e:  # no index.json, or a damaged one (named, with the fix)
        print(f"inspect_shards: error: {e}", file=sys.stderr)
        return 2
    summary = summarize(index)
    if a.verify:
        summary["verify"] = verify(a.url, index)
    if a.json:
        print(json.dumps(summary, indent=1))
    else:
        print(f"{store.redact(a.url)}: {summary['count']} images in {summary['shards']} shards, "
              f"{summary['bytes'] / 1e6:.1f} MB, labeled={summary['labeled']}")
        if summary["class_histogram"]:
            print("classes: " + ", ".join(f"{n}={c}" for n, c in summary["class_histogram"].items()))
        print(f"failed inputs: {summary['num_failures']}"
              + (" (" + ", ".join(f"{k} {v}" for k, v in summary["failure_reasons"].items()) + ")"
                 if summary["failure_reasons"] else ""))
        if a.verify:
            v = summary["verify"]
            print(f"verify: {v['decoded']} decoded, {v['bad']} bad samples, counts match index: {v['counts_match']}")
    if a.grid:
        n = draw_grid(a.url, index, a.grid, a.grid_count)
        print(f"wrote {a.grid} ({n} images)")
    if a.verify and (summary["verify"]["bad"] or not summary["verify"]["counts_match"]):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
