"""Where the build's jobs run: inline, in local processes, or as tasks on a Ray cluster.

Every job is idempotent (a shard with its stats is not written again), so the same jobs run the
same way on any of them, and a job lost with a machine is simply run again: Ray retries it on
another node, and a rerun of the build writes only the shards without stats (img2dataset's
distributors work the same way).
"""
from __future__ import annotations

import logging
import multiprocessing as mp
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Callable, Iterator, Optional

from distssl.storage import store

log = logging.getLogger(__name__)

# what a worker on another node needs to reach the same stores (endpoints, not secrets: credentials
# come from each node's own chain, as on any cluster)
FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION",
                 "STORAGE_EMULATOR_HOST", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "DISTSSL_IO_ATTEMPTS")


class LocalRunner:
    """Runs jobs inline (1 worker) or in spawned processes (fork is unsafe with s3fs' event loops)."""

    def __init__(self, workers: int):
        self.pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) if workers > 1 else None

    def map(self, fn: Callable, items: list) -> list:
        return list(self.pool.map(fn, items, chunksize=4)) if self.pool else [fn(x) for x in items]

    def unordered(self, fn: Callable, items: list) -> Iterator:
        if not self.pool:
            for x in items:
                yield fn(x)
            return
        futures = [self.pool.submit(fn, x) for x in items]
        for fut in as_completed(futures):
            yield fut.result()

    def close(self) -> None:
        if self.pool:
            self.pool.shutdown(cancel_futures=True)


def _apply_chunk(fn: Callable, chunk: list) -> list:
    return [fn(x) for x in chunk]


class RayRunner:
    """Jobs as Ray tasks (one CPU each, retried when their node dies) on the cluster at ``address``."""

    CHUNK = 64  # small per-input calls (verify, hash) go in chunks: a task costs a few ms to schedule

    def __init__(self, address: str, dst: str):
        try:
            import ray
        except ImportError:
            raise ValueError("--ray-address needs Ray: pip install 'ray[default]'") from None
        self.ray = ray
        env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
        try:
            ray.init(address=address, ignore_reinit_error=True, log_to_driver=False,
                     runtime_env={"env_vars": env} if env else None)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise ValueError(f"--ray-address {address}: no Ray cluster there ({e}). Start one with "
                             f"`ray start --head` (and `ray start --address HEAD:6379` on the other nodes), "
                             f"or build without --ray-address") from None
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        hosts = {n.get("NodeManagerAddress") for n in nodes}
        if len(hosts) > 1 and store.is_local(store.filesystem(dst)[0]):
            raise ValueError(f"{store.redact(dst)} is a local path but the Ray cluster spans {len(hosts)} machines: "
                             f"each would write to its own disk. Give a shared store (s3://, gs://, a shared mount "
                             f"as file://) as the destination")
        log.info("Ray cluster: %d nodes, %d CPUs", len(nodes), int(ray.cluster_resources().get("CPU", 0)))
        self._task = ray.remote(num_cpus=1, max_retries=3, retry_exceptions=False)(_apply_chunk)

    def _submit(self, fn: Callable, chunks: list[list]) -> list:
        return [self._task.remote(fn, c) for c in chunks]

    def map(self, fn: Callable, items: list) -> list:
        chunks = [items[i: i + self.CHUNK] for i in range(0, len(items), self.CHUNK)]
        return [y for part in self.ray.get(self._submit(fn, chunks)) for y in part]

    def unordered(self, fn: Callable, items: list) -> Iterator:
        pending = self._submit(fn, [[x] for x in items])
        while pending:
            done, pending = self.ray.wait(pending, num_returns=1)
            for ref in done:
                yield from self.ray.get(ref)

    def close(self) -> None:
        self.ray.shutdown()


def make_runner(workers: int, ray_address: Optional[str], dst: str):
    return RayRunner(ray_address, dst) if ray_address else LocalRunner(workers)
