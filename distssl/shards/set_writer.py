"""Writing a recorded build: every planned shard as a job (processes or Ray tasks, distssl.shards.runners),
skipped when its stats exist, then each set's ``index.json`` from its shards' stats, written last and only
when it changed (a rerun of a finished build leaves every object untouched)."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Iterator, Optional

from distssl.data.index import FORMAT, INDEX_NAME
from distssl.shards.build_record import Record
from distssl.shards.images import ImageOptions
from distssl.shards.splits import set_order
from distssl.shards.writer import ShardJob, read_stats, run_job
from distssl.storage import store
from distssl.tracking.progress import bar as progress_bar


def input_url(base: str, rel: str) -> str:
    return rel if not base or "://" in rel or rel.startswith("/") else store.join(base, rel)


def set_url(dst: str, name: str) -> str:
    return store.join(dst, name) if name else dst


def is_labeled_set(name: str, options: dict) -> bool:
    return name != "unlabeled" and not options["unlabeled"]


def run_set_job(job: ShardJob) -> dict:
    """A shard job's stats, with the set it belongs to (shard names repeat from set to set)."""
    return {**run_job(job), "set_url": job.set_url}


def part_jobs(dst: str, part, options: dict, base: str, image: ImageOptions) -> Iterator[tuple[str, ShardJob]]:
    """Every shard of one part of the record, (set name, job), as it planned them."""
    for name in set_order(part.sets):
        plan = part.sets[name]
        k = plan.first_key
        for n, members in enumerate(plan.shards):
            keys = [f"{k + j:09d}" for j in range(len(members))]
            k += len(members)
            yield name, ShardJob(set_url(dst, name), plan.first_shard + n, keys,
                                 [input_url(base, part.rels[i]) for i in members], [part.rels[i] for i in members],
                                 [part.labels[i] for i in members], is_labeled_set(name, options), image)


@dataclass
class SetTotals:
    """What a set's index needs of its shards' stats, summed as they come (no per-shard class counts kept:
    a 100M-key build has 100k shards)."""
    shards: list[dict] = field(default_factory=list)  # name, count, bytes
    hist: dict[int, int] = field(default_factory=dict)
    failures: list[dict] = field(default_factory=list)
    done: set = field(default_factory=set)

    def add(self, st: dict) -> None:
        if st["name"] in self.done:
            return
        self.done.add(st["name"])
        self.shards.append({"name": st["name"], "count": st["count"], "bytes": st["bytes"]})
        for k, v in st["class_counts"].items():
            self.hist[int(k)] = self.hist.get(int(k), 0) + v
        self.failures += st["failures"]


def complete(dst: str, record: Record, base: str, image: ImageOptions, runner, progress: bool,
              generations: Optional[range] = None) -> dict[str, SetTotals]:
    """Write every shard of the record without stats, a part at a time (its jobs only in memory); returns
    each set's totals over all its shards."""
    planned: dict[str, int] = {}
    for head in record.heads:
        for name, v in head["sets"].items():
            planned[name] = planned.get(name, 0) + v["planned"]
    totals = {name: SetTotals() for name in set_order(planned)}
    bar = progress_bar(total=sum(planned.values()), desc="shards", unit="img", disable=not progress, dynamic_ncols=True)
    failed, written, t0 = 0, 0, time.time()
    for _, part in record.parts(generations):
        todo = []
        for name, job in part_jobs(dst, part, record.options, base, image):
            st = read_stats(job.set_url, job.stats_name)  # complete shards are counted, not rewritten
            if st is None:
                todo.append((name, job))
            else:
                totals[name].add(st)
                bar.update(len(job.keys))
        set_of = {job.set_url: name for name, job in todo}
        for st in runner.unordered(run_set_job, [job for _, job in todo]):
            totals[set_of[st.pop("set_url")]].add(st)
            failed += len(st["failures"])
            written += st["count"] + len(st["failures"])
            bar.update(st["count"] + len(st["failures"]))
            bar.set_postfix(failed=failed, img_s=f"{written / max(1e-9, time.time() - t0):.0f}")
    bar.close()
    return totals


def write_index(url: str, name: str, record: Record, totals: SetTotals, extra: dict) -> dict:
    planned = [f for _, part in record.parts() if name in part.sets for f in part.sets[name].failures]
    failures = planned + totals.failures
    hist = [0] * len(record.class_names)
    for k, v in totals.hist.items():
        hist[k] += v
    shards = sorted(totals.shards, key=lambda st: st["name"])
    reasons = _reason_counts(failures)
    index = {
        "format": FORMAT, "count": sum(st["count"] for st in shards), "labeled": is_labeled_set(name, record.options),
        "num_classes": len(record.class_names) or None, "class_names": record.class_names,
        "class_histogram": hist,
        "shards": shards,
        "bytes": sum(st["bytes"] for st in shards),
        "failures": failures, "num_failures": len(failures), "failure_reasons": reasons,
        "duplicates": reasons.get("duplicate", 0),
        "source": record.source, "seed": record.options["seed"], "max_count": record.options["max_count"],
        "generations": sum(name in head["sets"] for head in record.heads), **extra,
    }
    if failures:
        _write_if_changed(store.join(url, "failures.jsonl"),
                          "".join(json.dumps(f, sort_keys=True) + "\n" for f in failures).encode())
    _write_if_changed(store.join(url, INDEX_NAME), json.dumps(index, indent=1).encode())
    return index


def _reason_kind(reason: str) -> str:
    return "duplicate" if reason.startswith("duplicate of ") else reason.split(":", 1)[0]


def source_skipped(skipped: list[tuple[str, str]], listed: int = 100) -> dict:
    """What the source held that is not an input (files that are not images, links to nothing, files outside
    any class folder): counted by reason, the first ``listed`` named."""
    reasons: dict[str, int] = {}
    for _, why in skipped:
        reasons[why] = reasons.get(why, 0) + 1
    return {"count": len(skipped), "reasons": reasons, "files": [key for key, _ in skipped[:listed]]}


def _reason_counts(failures: list[dict]) -> dict[str, int]:
    out: dict[str, int] = {}
    for f in failures:
        kind = _reason_kind(f["reason"])
        out[kind] = out.get(kind, 0) + 1
    return dict(sorted(out.items()))


def _write_if_changed(url: str, body: bytes) -> None:
    """A rerun of a finished build leaves every object untouched."""
    try:
        if store.read_bytes(url) == body:
            return
    except FileNotFoundError:
        pass
    store.write_bytes(url, body)


def written_hashes(dst: str, record: Record) -> Iterator[tuple[str, str]]:
    """(content hash, SET/KEY) of every written sample, eval first, then labeled, read from the shards'
    stats a shard at a time."""
    for wanted in set_order({name for head in record.heads for name in head["sets"]}):
        for _, part in record.parts():
            if wanted not in part.sets:
                continue
            for name, job in part_jobs(dst, part, record.options, "", ImageOptions()):
                if name != wanted:
                    continue
                st = read_stats(job.set_url, job.stats_name) or {}
                for key, sha in st.get("samples", []):
                    yield sha, f"{name}/{key}" if name else key


def removed_by_set(record: Record) -> dict[str, int]:
    """How many samples of each set come from inputs since removed from the source."""
    gone = {r for _, part in record.parts() for r in part.removed}
    out: dict[str, int] = {}
    if not gone:
        return out
    for _, part in record.parts():
        for name, plan in part.sets.items():
            out[name] = out.get(name, 0) + sum(part.rels[i] in gone for shard in plan.shards for i in shard)
    return out
