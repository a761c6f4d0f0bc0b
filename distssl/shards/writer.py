"""Write one shard: read, verify/convert, tar, publish, then its stats (the done-marker).

A shard is complete exactly when ``shard-NNNNNN.stats.json`` exists: the tar is published first
(temporary name + rename, or an object-store upload that appears only when complete) and the stats
after it, so a build killed at any point reruns only the shards without stats.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from distssl.shards.images import ImageOptions, process_image
from distssl.shards.inputs import read_many
from distssl.storage import store


@dataclass
class ShardJob:
    set_url: str
    index: int  # shard number
    keys: list[str]
    urls: list[str]
    rels: list[str]
    labels: list[int]
    labeled: bool  # write ``cls`` (else the true label, when known, goes only into ``json``)
    opts: ImageOptions = field(default_factory=ImageOptions)

    @property
    def name(self) -> str:
        return f"shard-{self.index:06d}.tar"

    @property
    def stats_name(self) -> str:
        return f"shard-{self.index:06d}.stats.json"


def tar_writer(f):
    """webdataset's TarWriter: one dict per sample, fields written in key order, bytes as given (no
    encoder); mtime and owner fixed so that a rerun writes the same bytes. Imported here: webdataset's
    import is slow (docs/benchmarks.md, development notes), and no training rank needs it."""
    import webdataset

    return webdataset.TarWriter(f, encoder=False, mtime=0, mode=0o644, user="distssl", group="distssl")


def read_stats(set_url: str, stats_name: str) -> dict | None:
    try:
        return store.read_json(store.join(set_url, stats_name),
                               "remove it and rerun the same build: the shard beside it is written again")
    except FileNotFoundError:
        return None


def write_shard(job: ShardJob) -> dict:
    """Returns the shard's stats: count, bytes, class counts, each sample's key and content hash (what
    ``--extend`` and ``--dedup`` compare new inputs against) and the failed inputs with why."""
    failures, count, hist, hashes = [], 0, {}, []
    with store.atomic_write(store.join(job.set_url, job.name)) as f:
        with tar_writer(f) as tar:
            # reads overlap, or go a Parquet row group at a time (shards.inputs); order is kept
            for key, (url, rel, label), data in zip(job.keys, zip(job.urls, job.rels, job.labels),
                                                    read_many(job.urls)):
                if isinstance(data, (FileNotFoundError, PermissionError, IsADirectoryError)):
                    failures.append({"input": rel, "reason": f"unreadable: {type(data).__name__}: {data}"})
                    continue
                if isinstance(data, Exception):  # the store, not the image: never mark the shard complete
                    raise OSError(f"{store.redact(url)}: still unreadable after retries ({type(data).__name__}: "
                                  f"{data}); shard {job.name} was not written. Rerun the same command when the "
                                  f"store is back: finished shards are kept") from data
                payload, ext, reason = process_image(data, job.opts)
                if reason:
                    failures.append({"input": rel, "reason": reason})
                    continue
                sha256 = hashlib.sha256(data).hexdigest()  # of the original bytes, whatever is stored
                meta = {"path": rel, "sha256": sha256, **({"label": label} if label >= 0 else {})}
                sample = {"__key__": key, ext: payload, "json": json.dumps(meta, sort_keys=True).encode()}
                if job.labeled:
                    sample["cls"] = str(label).encode()
                tar.write(sample)
                count += 1
                hashes.append([key, sha256])
                if label >= 0:
                    hist[label] = hist.get(label, 0) + 1
        f.flush()
    fs, path = store.filesystem(store.join(job.set_url, job.name))
    stats = {"name": job.name, "count": count, "bytes": int(fs.info(path)["size"]),
             "class_counts": {str(k): v for k, v in sorted(hist.items())}, "failures": failures,
             "samples": hashes}
    store.write_bytes(store.join(job.set_url, job.stats_name), json.dumps(stats, sort_keys=True).encode())
    return stats


def run_job(job: ShardJob) -> dict:
    """Entry point for worker processes: a complete shard is not written again."""
    return read_stats(job.set_url, job.stats_name) or write_shard(job)
