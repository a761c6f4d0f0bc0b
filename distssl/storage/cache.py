"""A bounded local cache of remote shards (``data.cache_dir``, ``data.cache_limit_gb``): the first read
of a shard from an object store keeps a copy on local disk, so later epochs read it locally instead of
paying the egress again (MosaicML Streaming's ``cache_limit``, for our shards).

- One folder per node, shared by its ranks and loader workers: a shard is fetched by one process at a
  time (a lock file per shard); the others wait for it and read the copy.
- A copy appears only complete: it is written under a temporary name and renamed, its size checked
  against the shard's ``bytes`` in ``index.json``, and its sha256 (computed while fetching) kept beside
  it in ``NAME.sha256``. Every later open checks both (a 100 MB shard hashes in ~60 ms, against seconds
  of decoding); a copy that fails either is dropped with a warning and the shard is read from the store.
- Past the limit, the least recently used copies are deleted (each open touches its copy's mtime). A
  process that still reads a deleted copy keeps its open file.
- A cache that cannot write (a full disk, no permission) never stops training: the shard is read from
  the store, with one warning per cause.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import uuid
from pathlib import Path
from typing import IO, Optional

from distssl.storage import atomic, store

log = logging.getLogger(__name__)
CHUNK = 4 * 1024 * 1024


class ShardCache:
    def __init__(self, root: str, limit_gb: float):
        self.root = Path(root).expanduser()
        self.limit = int(limit_gb * 2 ** 30)
        self._bypass: set[str] = set()  # shards whose copy was bad in this process: the store serves them
        self._warned: set[str] = set()

    def __getstate__(self):  # loader workers get a fresh one (their own warnings, their own bypasses)
        return {"root": self.root, "limit": self.limit}

    def __setstate__(self, state):
        self.root, self.limit = state["root"], state["limit"]
        self._bypass, self._warned = set(), set()

    def path_for(self, url: str) -> Path:
        name = url.rstrip("/").rsplit("/", 1)[-1]
        digest = hashlib.sha256(url.encode()).hexdigest()[:16]  # the same name in two sets: two copies
        return self.root / f"{digest}-{name}"

    def _warn(self, cause: str, text: str) -> None:
        if cause not in self._warned:
            self._warned.add(cause)
            log.warning(text)

    # -- reading --------------------------------------------------------------------------------------

    def open(self, url: str, size: Optional[int] = None) -> IO[bytes]:
        """The shard at ``url`` for sequential reading: the local copy when it is good, else fetched into
        the cache (when it fits) and then read locally, else straight from the store."""
        if url in self._bypass or (size is not None and size > self.limit):
            if size is not None and size > self.limit:
                self._warn("limit", f"data.cache_limit_gb={self.limit / 2 ** 30:g} is smaller than one shard "
                                    f"({size / 2 ** 30:.2f} GB): reading from the store uncached")
            return store.open_stream(url)
        path = self.path_for(url)
        try:
            found = self._open_copy(path, size)
            if found is not None:
                return found
            return self._fetch(url, path, size)
        except OSError as e:  # a full disk, a read-only folder: the store still has the shard
            self._warn(f"os:{getattr(e, 'errno', None)}", f"data.cache_dir={self.root}: {type(e).__name__}: {e}; "
                                                         f"reading shards from the store instead")
            return store.open_stream(url)

    def _open_copy(self, path: Path, size: Optional[int]) -> Optional[IO[bytes]]:
        try:
            st = path.stat()
        except FileNotFoundError:
            return None
        why = None
        if size is not None and st.st_size != size:
            why = f"{st.st_size} bytes where index.json says {size}"
        else:
            try:
                want = path.with_name(path.name + ".sha256").read_text().strip()
            except FileNotFoundError:
                want = None
            f = open(path, "rb", buffering=1024 * 1024)
            digest = hashlib.sha256()
            for chunk in iter(lambda: f.read(CHUNK), b""):
                digest.update(chunk)
            if want is not None and digest.hexdigest() == want:
                f.seek(0)
                with contextlib.suppress(OSError):
                    os.utime(path)  # most recently used
                return f
            f.close()
            why = "its content hash differs from the one taken when it was fetched" if want else "no content hash"
        log.warning("cached shard %s is damaged (%s): dropped, fetching it again from the store", path, why)
        self._remove(path)
        return None

    def _fetch(self, url: str, path: Path, size: Optional[int]) -> IO[bytes]:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(path.with_name(path.name + ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one process of the node fetches; the others wait for its copy
            try:
                found = self._open_copy(path, size)
                if found is not None:
                    return found
                tmp = path.with_name(f"{path.name}.tmp-{uuid.uuid4().hex[:8]}")
                digest, got = hashlib.sha256(), 0
                try:
                    with store.open_stream(url) as src, open(tmp, "wb") as dst:
                        for chunk in iter(lambda: src.read(CHUNK), b""):
                            dst.write(chunk)
                            digest.update(chunk)
                            got += len(chunk)
                    if size is not None and got != size:
                        raise OSError(f"{store.redact(url)}: read {got} bytes where index.json says {size}")
                    self._evict(room_for=got, keep=path)
                    path.with_name(path.name + ".sha256").write_text(digest.hexdigest())
                    atomic.publish(tmp, path)
                finally:
                    with contextlib.suppress(FileNotFoundError):
                        tmp.unlink()
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
        return open(path, "rb", buffering=1024 * 1024)

    @property
    def bypassed(self) -> set[str]:
        return self._bypass

    def bypass(self, url: str) -> None:
        """The copy of ``url`` turned out damaged while it was read: drop it; this process reads the store."""
        self._bypass.add(url)
        path = self.path_for(url)
        log.warning("cached shard %s failed while it was read: dropped; reading %s from the store", path,
                    store.redact(url))
        self._remove(path)

    # -- keeping it bounded ---------------------------------------------------------------------------

    def copies(self) -> list[tuple[float, int, Path]]:
        """(last use, bytes, path) of every complete copy, oldest first."""
        out = []
        for p in self.root.glob("*"):
            if p.name.endswith((".sha256", ".lock")) or ".tmp-" in p.name:
                continue
            with contextlib.suppress(FileNotFoundError):
                st = p.stat()
                out.append((st.st_mtime, st.st_size, p))
        return sorted(out)

    def _evict(self, room_for: int, keep: Path) -> None:
        copies = self.copies()
        total = sum(n for _, n, _ in copies) + room_for
        for _, n, p in copies:
            if total <= self.limit:
                break
            if p != keep:
                self._remove(p)
                total -= n

    @staticmethod
    def _remove(path: Path) -> None:
        for p in (path, path.with_name(path.name + ".sha256")):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()


def cache_for(root: Optional[str], limit_gb: float) -> Optional[ShardCache]:
    return ShardCache(root, limit_gb) if root else None

