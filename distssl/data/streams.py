"""Labeled / unlabeled / eval streams over WebDataset shards, as composable generator stages.

    shard schedule -> groups of shards -> tar samples, interleaved -> shuffle buffer -> [skip to cursor]
        -> decode + views -> batches

Why this shape:
- Training streams are infinite and resampled: every epoch is a (seed, epoch) permutation of the
  shards, split across all loader workers of all ranks (``g = rank * workers + worker``), so no
  sample is seen twice within an epoch and every rank has a full stream even when the shard count
  does not divide (fewer shards than workers: workers share shards with different shuffles).
- Batches mix shards: each loader worker reads a group of ``interleave_shards`` shards at once, the
  next sample drawn from a random one of them, through one shuffle buffer (FixMatch's ImageNet
  input interleaves 16 files the same way), so a batch holds samples of many shards and the images
  an image shares batches with change from epoch to epoch.
- The data position is exact and cheap to restore: each batch carries its worker's cursor (raw
  samples consumed in that worker's sequence, a pure function of which the open shards and their
  positions follow); resuming skips whole shard groups by their index counts without opening them,
  and replays at most one group's bytes without decoding them.
- Augmentation randomness is seeded per sample from (seed, worker, position): a resumed run sees
  the same views as an uninterrupted one.
- Nothing is unpickled: samples are image bytes, ascii ``cls`` and ``json``.
"""
from __future__ import annotations

import functools
import itertools
import json
import logging
import random
import tarfile
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Optional

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from distssl.data.index import ShardSet
from distssl.data.position import StreamPlan, Unit, reader_groups, replan, unit_size
from distssl.data.ring import RAGGED_PREFIX, RingReader, RingWriter
from distssl.data.tar import tar_members
from distssl.storage import store

log = logging.getLogger(__name__)


class DataError(RuntimeError):
    """The data cannot feed the run: too many unusable samples, or a stream with nothing readable."""


@dataclass
class Raw:
    key: str
    fields: dict[str, bytes]
    source: int = 0  # which of the stream's shard sets it comes from (their label maps differ)
    index: int = -1  # its position in its shard (raw order)
    shard: int = -1  # which shard of the stream's ShardSet


# --- stages --------------------------------------------------------------------------------------

def tar_samples(url: str, opener: Optional[Callable[[], Any]] = None) -> Iterator[Raw]:
    """Group consecutive tar members by key (the basename up to its first dot). ``opener`` opens the
    shard (e.g. through the local cache); by default its store does."""
    with (opener() if opener is not None else store.open_stream(url)) as f:
        current: Optional[Raw] = None
        for name, data in tar_members(f):
            base = name.rsplit("/", 1)[-1]
            if "." not in base:
                continue
            stem, ext = base.split(".", 1)
            key = name[: len(name) - len(base)] + stem
            if current is None or current.key != key:
                if current is not None:
                    yield current
                current = Raw(key, {})
            current.fields[ext.lower()] = data
        if current is not None:
            yield current


def resilient_samples(url: str, attempts: int = 6, base_delay: float = 0.5, opener: Optional[Callable] = None,
                      drop_copy: Optional[Callable[[], bool]] = None) -> Iterator[Raw]:
    """``tar_samples`` that survives a flaky object store: on a read error it backs off, reopens the
    shard and skips the samples it already yielded (a shard's raw order is fixed). Damage is final,
    unless it was in a local copy (``drop_copy()`` drops it and says so): then the store is read."""
    done, delay = 0, base_delay
    for attempt in range(attempts):
        try:
            for i, raw in enumerate(tar_samples(url, opener)):
                if i >= done:
                    done += 1
                    raw.index = i
                    yield raw
            return
        except (FileNotFoundError, PermissionError):
            raise
        except Exception as e:  # network errors come as many types (OSError, aiohttp, botocore)
            if is_damage(e):
                if drop_copy is not None and drop_copy():
                    continue  # the cached copy was bad, not the shard: read the store's
                raise  # permanent: retrying would read the same bytes
            if attempt == attempts - 1:
                raise
            log.warning("shard %s: %s after %d samples; retrying in %.1fs", store.redact(url), e, done, delay)
            time.sleep(delay)
            delay = min(2 * delay, 30.0)


def shard_samples(shards, shard: int) -> Iterator[Raw]:
    """The samples of one shard of a ShardSet, through its local cache when it has one."""
    return resilient_samples(shards.urls[shard], opener=lambda: shards.open(shard),
                             drop_copy=lambda: shards.drop_copy(shard))


def is_damage(e: BaseException) -> bool:
    """Permanent damage (a bad or cut tar header: the bytes are wrong) rather than a passing outage (a
    refused or cut connection, which a wrapped cause shows: retried)."""
    if not isinstance(e, (tarfile.TarError, EOFError)):
        return False
    cause = e.__cause__ if e.__cause__ is not None else (None if e.__suppress_context__ else e.__context__)
    return cause is None or isinstance(cause, (tarfile.TarError, EOFError))


def interleave(sources: dict[int, Iterator[Raw]], remaining: Optional[dict[int, int]], rng: random.Random,
               on_error: Callable[[int, int, Exception], None]) -> Iterator[tuple[int, Raw]]:
    """(shard, sample) from several shards at once, the next shard drawn at random: weighted by the
    samples each has left when the index knows them (a uniform random interleaving of the shards),
    else uniformly among those not yet finished. Deterministic for a given ``rng``: the same draws
    replay the same sequence, which is what makes a resume exact. A shard that fails (damaged, or
    unreachable after retries) is reported through ``on_error`` and dropped; the others go on."""
    live, read = list(sources), {s: 0 for s in sources}
    while live:
        if len(live) == 1:
            s = live[0]
        elif remaining is not None:
            s = rng.choices(live, weights=[max(1, remaining[x] - read[x]) for x in live])[0]
        else:
            s = live[rng.randrange(len(live))]
        try:
            raw = next(sources[s])
        except StopIteration:
            live.remove(s)
            continue
        except Exception as e:  # noqa: BLE001 - a damaged shard is skipped, not fatal
            on_error(s, read[s], e)
            live.remove(s)
            continue
        read[s] += 1
        yield s, raw


def _without(samples: Iterator[Raw], skip: frozenset) -> Iterator[Raw]:
    return (raw for raw in samples if raw.index not in skip) if skip else samples


def buffer_shuffle(samples: Iterable, bufsize: int, rng: random.Random) -> Iterator:
    """Deterministic shuffle buffer (reset per shard group, so a cursor maps to one group position)."""
    buf: list = []
    for s in samples:
        if len(buf) < bufsize:
            buf.append(s)
            continue
        i = rng.randrange(len(buf))
        buf[i], s = s, buf[i]
        yield s
    rng.shuffle(buf)
    yield from buf


def _worker_id(rank: int) -> tuple[int, int]:
    """(global worker id, loader workers per rank); the training process itself is worker 0 of 1."""
    info = get_worker_info()
    if info is None:
        return rank, 1
    return rank * info.num_workers + info.id, info.num_workers


class TrainStream(IterableDataset):
    """Infinite batches for one rank; ``make_item(raw, rng) -> dict | None`` builds one sample; ``on_step(s)``,
    when given, is told the step of the batch a worker starts filling (a builder that draws from a policy
    learned in training: CTAugment)."""

    def __init__(self, shards: ShardSet, *, rank: int, world_size: int, batch_size: int, seed: int,
                 shuffle_buffer: int, make_item: Callable, cursors: Optional[dict[int, int]] = None,
                 trace_dir: Optional[str] = None, name: str = "train", interleave_shards: int = 1,
                 plan: Optional[StreamPlan] = None, first_step: int = 0,
                 on_step: Optional[Callable[[int], None]] = None):
        self.shards, self.rank, self.world_size = shards, rank, world_size
        self.first_step = first_step  # the step of the first batch this stream hands over (its resume step)
        self.plan = plan or StreamPlan()  # what an earlier run with another reader count left to read first
        self.trace_dir, self.name = trace_dir, name
        self.batch_size, self.seed, self.shuffle_buffer = batch_size, seed, shuffle_buffer
        self.make_item, self.cursors, self.on_step = make_item, dict(cursors or {}), on_step
        self.interleave_shards = interleave_shards
        self._unread = 0  # samples of damaged shards never read, counted into the next batch's "skipped"
        self._first_error: Optional[str] = None

    def _raw_sequence(self, g: int, G: int, skip: int) -> Iterator[tuple[int, int, Raw]]:
        """(position, shard, raw sample) from position ``skip`` on. A group of shards whose index
        counts end before ``skip`` is passed over without opening it; inside the group that holds
        ``skip``, the mixed sequence is replayed (bytes read, nothing decoded) up to it."""
        counts = self.shards.counts
        pos = 0
        current, opened, read = None, [], 0  # this phase's shards opened and samples read by this reader
        for phase, label, units in reader_groups(self.shards, self.plan, g, G, self.seed, self.interleave_shards):
            if phase != current:
                self._check_epoch(opened, read)
                current, opened, read = phase, [], 0
            total = sum(unit_size(counts, u) for u in units) if counts is not None else None
            if total is not None and pos + total <= skip:
                pos += total  # skipped without opening its shards
                read += total
                continue
            opened += [u.shard for u in units]
            if self.trace_dir:
                for u in units:
                    self._trace(g, phase[1], u.shard, pos)
            for j, raw in self._mixed(units, g, label):
                read += 1
                if pos >= skip:
                    yield pos, units[j].shard, raw
                pos += 1

    def _mixed(self, units: list[Unit], g: int, label: str) -> Iterator[tuple[int, Raw]]:
        """(slot, raw sample) of one group of reader ``g``, in its deterministic mixed order. Keyed by
        slot: a weighted source may put one shard twice into a group."""
        counts = self.shards.counts
        sources = {j: _without(shard_samples(self.shards, u.shard), u.skip) for j, u in enumerate(units)}
        remaining = {j: unit_size(counts, u) for j, u in enumerate(units)} if counts is not None else None
        failed = lambda j, read, e: self._shard_failed(units[j].shard, read + len(units[j].skip), e)  # noqa: E731
        yield from self._group_order(units, g, label, sources, remaining, failed)

    def _group_order(self, units: list[Unit], g: int, label: str, sources: dict, remaining: Optional[dict],
                     failed: Callable) -> Iterator[tuple[int, Raw]]:
        """The mixed order of one group's ``sources``: its draws are seeded by the group alone, so
        reading it and replaying it from the shard counts (replan) give the same order."""
        rng = random.Random(f"shuffle:{self.seed}:{label}:{units[0].shard}:{g}")
        return buffer_shuffle(interleave(sources, remaining, rng, failed), self.shuffle_buffer, rng)

    def replan(self, cursors: dict[int, int], readers: int) -> StreamPlan:
        """The plan that continues, for any reader count, where ``readers`` readers at ``cursors``
        stopped. A group's mixed order depends only on its seeded draws and its shards' counts, not on
        the bytes, so the part of it a reader consumed is found without reading the shards (a shard
        that was damaged mid-read changed the real order: around it a sample may be read twice)."""
        def replay(units, g, label, n):
            sources = {j: (Raw("", {}, index=i) for i in range(self.shards.counts[u.shard]) if i not in u.skip)
                       for j, u in enumerate(units)}
            remaining = {j: unit_size(self.shards.counts, u) for j, u in enumerate(units)}
            order = self._group_order(units, g, label, sources, remaining, lambda *a: None)
            return [(j, raw.index) for j, raw in itertools.islice(order, n)]
        return replan(self.shards, self.plan, cursors, readers, self.seed, self.interleave_shards, replay)

    def _check_epoch(self, opened: list[int], read: int) -> None:
        """A reader that went through a whole epoch of its shards without one sample would cycle
        through epochs for ever (and its loader never hand over a batch): stop, naming the set."""
        if opened and read == 0:
            raise DataError(f"data.{self.name}: not one sample could be read in a whole epoch of this reader's "
                            f"{len(opened)} shard(s) (e.g. {store.redact(self.shards.urls[opened[0]])}: "
                            f"{self._first_error or 'no samples'}). The shards are damaged or unreachable: check "
                            f"them with distssl-inspect --verify, or rebuild them")

    def _shard_failed(self, shard: int, read: int, e: Exception) -> None:
        """A damaged shard (or one unreachable after retries) is skipped, not fatal, and the samples it
        still held (by the index, else one) count as skipped toward train.max_bad_fraction."""
        counts = self.shards.counts
        unread = max(1, counts[shard] - read) if counts is not None else 1
        self._unread += unread
        self._first_error = self._first_error or f"{type(e).__name__}: {e}"
        kind = "damaged" if is_damage(e) else "unreachable after retries"
        log.warning("shard %s: %s past sample %d (%s: %s); going on without it (%d samples counted as skipped)",
                    store.redact(self.shards.urls[shard]), kind, read, type(e).__name__, e, unread)

    def _trace(self, g: int, epoch: int, shard: int, pos: int) -> None:
        """One JSON line per shard opened: which global worker read which shard in which epoch."""
        import os
        os.makedirs(self.trace_dir, exist_ok=True)
        with open(os.path.join(self.trace_dir, f"{self.name}_g{g:04d}.jsonl"), "a") as f:
            f.write(json.dumps({"rank": self.rank, "g": g, "epoch": epoch, "shard": shard, "pos": pos}) + "\n")

    def __iter__(self) -> Iterator[dict]:
        return self.batches(collate)

    def batches(self, pack: Callable[[list[dict]], dict]) -> Iterator[dict]:
        """This reader's batches, each made by ``pack`` (plain ``collate``, or a ring writer's)."""
        g, per_rank = _worker_id(self.rank)
        G = self.world_size * per_rank
        items, skipped, warned = [], 0, set()
        # a builder that draws from a policy learned in training (CTAugment) is told each batch's step: the
        # loader hands over its workers' batches in turn, so this worker's k-th is step first + k x workers + w
        at_step = self.on_step
        step, every = self.first_step + g - self.rank * per_rank, per_rank
        for pos, s, raw in self._raw_sequence(g, G, self.cursors.get(g, 0)):
            if at_step is not None and not items:
                at_step(step)
            raw.source, raw.shard = self.shards.source_of(s), s
            rng = random.Random(sample_seed(self.seed, g, pos))
            item = self.make_item(raw, rng)
            if item is None:
                skipped += 1
                if s not in warned:  # once per shard: a broken shard must not flood the log
                    warned.add(s)
                    log.warning("shard %s: skipping sample %s (no decodable image, or no cls in a labeled set); "
                                "further bad samples of this shard are counted, not logged",
                                store.redact(self.shards.urls[s]), raw.key)
                continue
            items.append(item)
            if len(items) == self.batch_size:
                batch = pack(items)
                skipped, self._unread = skipped + self._unread, 0
                batch["worker"], batch["cursor"], batch["skipped"] = g, pos + 1, skipped
                yield batch
                items, skipped = [], 0
                step += every


class EvalStream(IterableDataset):
    """Every eval sample exactly once across all ranks and loader workers."""

    def __init__(self, shards: ShardSet, *, rank: int, world_size: int, batch_size: int, make_item: Callable):
        self.shards, self.rank, self.world_size = shards, rank, world_size
        self.batch_size, self.make_item = batch_size, make_item

    def __iter__(self) -> Iterator[dict]:
        return self.batches(collate)

    def batches(self, pack: Callable[[list[dict]], dict]) -> Iterator[dict]:
        g, per_rank = _worker_id(self.rank)
        G = self.world_size * per_rank
        n = len(self.shards.urls)
        by_shard = n >= G  # each shard read once; else every worker reads all, keeps i % G == g
        items, skipped, i = [], 0, 0
        for s in range(n):
            if by_shard and s % G != g:
                continue
            for raw in shard_samples(self.shards, s):
                mine = by_shard or i % G == g
                i += 1
                if not mine:
                    continue
                item = self.make_item(raw, None)
                if item is None:
                    skipped += 1
                    continue
                items.append(item)
                if len(items) == self.batch_size:
                    yield {**pack(items), "skipped": skipped}
                    items, skipped = [], 0
        if items or skipped:
            yield {**(pack(items) if items else {}), "skipped": skipped}


def sample_seed(seed: int, g: int, pos: int) -> int:
    """The augmentation seed of sample ``pos`` of global worker ``g``: distinct for every
    (seed, g, pos) below 2**20 workers and 2**40 positions, and an int (seeding from a string
    hashes it with SHA-512 first)."""
    return ((seed & 0xFFFFFFFF) << 60) | ((g & 0xFFFFF) << 40) | (pos & 0xFFFFFFFFFF)


def collate(items: list[dict]) -> dict:
    """Stack per-sample fields. In a loader worker the stacked tensors are allocated in shared
    memory at once, as torch's default_collate does: handing the batch to the training process
    then moves a file descriptor instead of copying the batch into a fresh shared segment."""
    in_worker = get_worker_info() is not None
    out = {}
    for k in items[0]:
        vals = [it[k] for it in items]
        if k.startswith(RAGGED_PREFIX):  # per-sample lengths differ (undecoded image bytes): one flat tensor
            out[k], out[f"{k}_lengths"] = torch.cat(vals), torch.tensor([v.numel() for v in vals])
        elif not isinstance(vals[0], torch.Tensor):
            out[k] = torch.tensor(vals)
        elif in_worker:
            first = vals[0]
            storage = first.untyped_storage()._new_shared(first.nbytes * len(vals))
            dst = torch.empty(0, dtype=first.dtype).set_(storage).view(len(vals), *first.shape)
            out[k] = torch.stack(vals, out=dst)
        else:
            out[k] = torch.stack(vals)
    return out


def ring_collate(slots: int) -> Callable[[list[dict]], dict]:
    """Called inside a loader worker: a ring writer of ``slots`` shared buffers (plain ``collate``
    in the training process itself)."""
    return RingWriter(slots).collate if get_worker_info() is not None else collate


class Collated(IterableDataset):
    """A stream whose batches are made by the collate ``make_pack()`` returns, called in each worker."""

    def __init__(self, stream, make_pack: Callable[[], Callable[[list[dict]], dict]]):
        self.stream, self.make_pack = stream, make_pack

    def __iter__(self) -> Iterator[dict]:
        return self.stream.batches(self.make_pack())


def _as_is(batch):
    return batch


class RingLoader:
    """A DataLoader whose workers send ring messages, iterated as ordinary batches."""

    def __init__(self, dataloader: DataLoader, pin_memory: bool = False):
        self.dataloader, self.pin_memory = dataloader, pin_memory

    def __iter__(self) -> Iterator[dict]:
        reader = RingReader(pin_memory=self.pin_memory)  # copies out straight into page-locked memory
        for msg in self.dataloader:
            yield reader.unpack(msg)


def loader(dataset: IterableDataset, num_workers: int, prefetch_factor: int = 4, ring: bool = True,
           worker_init: Optional[Callable[[int], None]] = None):
    """Batches of ``dataset`` from ``num_workers`` processes, handed over through reused shared-memory
    slots (distssl.data.ring); with CUDA they are copied out into page-locked memory, without
    DataLoader's pin-memory thread (measured against it: docs/benchmarks.md, two-view stream).
    ``ring=False``: the standard DataLoader path. ``worker_init`` runs first in each worker (the
    trainer's: the preemption signals are the rank's, and a worker dies with its rank)."""
    cuda = torch.cuda.is_available()
    if num_workers == 0 or not ring:
        return DataLoader(dataset, batch_size=None, num_workers=num_workers, persistent_workers=False,
                          prefetch_factor=prefetch_factor if num_workers else None, pin_memory=cuda,
                          worker_init_fn=worker_init if num_workers else None)
    # two slots more than the batches a worker may have in flight: a worker never waits for one
    dataset = Collated(dataset, functools.partial(ring_collate, prefetch_factor + 2))
    return RingLoader(DataLoader(dataset, batch_size=None, num_workers=num_workers, persistent_workers=False,
                                 prefetch_factor=prefetch_factor, collate_fn=_as_is,
                                 worker_init_fn=worker_init), pin_memory=cuda)
