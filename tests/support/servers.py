"""What the tests and benchmarks start (kept out of the wheel): a local S3-protocol server (moto's server mode,
no internet needed), GCS and Azure emulators, a TCP proxy that can take one down, the commands that start ranks,
and bucket uploads."""
from __future__ import annotations

import fcntl
import os
import shutil
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from distssl.config.recipes import RECIPES


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


REPO_ROOT = Path(__file__).resolve().parents[2]


def deepspeed_command(script: str | Path, args: list[str] = (), nproc: int | None = 2, master_port: int | None = None,
                      hostfile: str | Path | None = None, node_rank: int | None = None) -> list[str]:
    """``deepspeed [--num_gpus N | --hostfile H --no_ssh --node_rank R --master_addr 127.0.0.1] --master_port P
    SCRIPT ARGS`` with this interpreter's launcher, on a free port unless one is given."""
    cmd = [str(Path(sys.executable).parent / "deepspeed")]
    if hostfile is not None:
        cmd += ["--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(node_rank or 0),
                "--master_addr", "127.0.0.1"]
    else:
        cmd += ["--num_gpus", str(nproc)]
    return cmd + ["--master_port", str(master_port or free_port()), str(script), *map(str, args)]


def ranks_command(script: str | Path, args: list[str] = (), nproc: int = 2,
                  master_port: int | None = None) -> list[str]:
    """NPROC ranks of SCRIPT on this machine under torchrun: the same process group and environment (RANK,
    LOCAL_RANK, WORLD_SIZE, MASTER_*) as DeepSpeed's launcher gives, started ~8 s sooner (DeepSpeed's runner
    imports deepspeed twice before a rank starts, and polls them once a second). For tests whose subject is
    what the ranks do; a test of what the user's ``deepspeed`` command does uses :func:`deepspeed_command`."""
    return [str(Path(sys.executable).parent / "torchrun"), "--nproc-per-node", str(nproc), "--master-addr",
            "127.0.0.1", "--master-port", str(master_port or free_port()), str(script), *map(str, args)]


def train_command(args: list[str] = (), nproc: int = 1, config: str | Path | None = None,
                  launcher: str = "torchrun", **launch) -> list[str]:
    """launch/train.py with the demo config (or ``config``): plain python for one process, else NPROC ranks
    under torchrun, or under the deepspeed launcher as a user starts them (``launcher="deepspeed"``, or a
    hostfile: ``launch`` as for :func:`deepspeed_command`)."""
    script = REPO_ROOT / "launch/train.py"
    full = ["--config", str(config or RECIPES / "demo.yaml"), *map(str, args)]
    if nproc == 1 and not launch and launcher != "deepspeed":
        return [sys.executable, str(script), *full]
    if launcher == "deepspeed" or "hostfile" in launch:
        return deepspeed_command(script, full, nproc=nproc, **launch)
    return ranks_command(script, full, nproc=nproc, **launch)


def launch_env(**extra: str) -> dict[str, str]:
    """The environment for a launched run on this CPU machine: DeepSpeed's CPU accelerator, unbuffered."""
    return {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1", **extra}


def upload_folder(local: str | Path, url: str) -> int:
    """Copy every file under ``local`` to the fsspec URL ``url`` (s3://bucket/prefix, gs://..., az://...,
    a path), creating the bucket when it does not exist; returns the number of files."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(url, skip_instance_cache=True)  # the endpoint as the env says now
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    is_local = "file" in protocols
    bucket = root.split("/", 1)[0]
    if not is_local and not fs.exists(bucket):
        fs.mkdir(bucket)
    files = [p for p in sorted(Path(local).rglob("*")) if p.is_file()]
    for p in files:
        target = f"{root.rstrip('/')}/{p.relative_to(local).as_posix()}"
        if is_local:
            fs.makedirs(fs._parent(target), exist_ok=True)
        fs.put_file(str(p), target)
    fs.invalidate_cache()
    return len(files)


@contextmanager
def _env(values: dict[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextmanager
def _serving(cmd: list[str], port: int, what: str, env: dict[str, str], timeout: float = 30.0) -> Iterator[None]:
    """Run a local server until it listens on ``port``; set ``env`` while it runs; stop it on exit."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{what} exited with code {proc.returncode} before it listened on port {port}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if time.time() > deadline:
                raise RuntimeError(f"{what} did not listen on port {port} within {timeout:.0f} s")
            time.sleep(0.1)
        with _env(env):
            yield
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after ``grace`` s: a server slow to shut down (Azurite on a loaded CI
    machine took over 10 s) must not fail the test that used it, nor outlive it."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=grace)


def _installed(name: str, hint: str) -> str:
    exe = shutil.which(name) or str(Path(sys.executable).parent / name)
    if not Path(exe).exists():
        raise RuntimeError(f"{name} is not installed: {hint}")
    return exe


@contextmanager
def local_s3(secret: str = "testing-secret") -> Iterator[str]:
    """Start ``moto_server`` on a free localhost port and point the AWS_* variables (which boto3 and
    s3fs follow) at it; restore them and stop the server on exit. Yields the endpoint URL."""
    exe = _installed("moto_server", 'pip install "moto[server]"')
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {"AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": secret,
           "AWS_DEFAULT_REGION": "us-east-1"}
    with _serving([exe, "-p", str(port)], port, "moto_server", env):
        yield url


@contextmanager
def local_gcs(port: int | None = None) -> Iterator[str]:
    """Start ``gcp-storage-emulator`` (PyPI) in memory on a free localhost port and point
    STORAGE_EMULATOR_HOST (which gcsfs follows) at it. Yields the endpoint URL."""
    exe = _installed("gcp-storage-emulator", "pip install gcp-storage-emulator")
    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    # gcsfs's gRPC bucket-type probe, which no emulator answers, off (distssl.storage.store does the same)
    env = {"STORAGE_EMULATOR_HOST": url, "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
    with _serving([exe, "start", "--host", "127.0.0.1", "--port", str(port), "--in-memory"], port,
                  "gcp-storage-emulator", env):
        yield url


AZURITE_ACCOUNT = "devstoreaccount1"  # Azurite's documented development account and key
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


def azurite_executable() -> str:
    """azurite-blob from PATH, else from ~/.cache/distssl/azurite, installed there with npm when missing."""
    found = shutil.which("azurite-blob")
    if found:
        return found
    prefix = Path(os.environ.get("DISTSSL_AZURITE_PREFIX", Path.home() / ".cache/distssl/azurite"))
    exe = prefix / "node_modules/.bin/azurite-blob"
    if exe.exists():
        return str(exe)
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError("Azurite needs node and npm (npm install azurite); neither azurite-blob nor npm is on PATH")
    prefix.mkdir(parents=True, exist_ok=True)
    with open(prefix / ".install.lock", "w") as lock:  # test processes side by side (pytest -n) install it once
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not exe.exists():
            r = subprocess.run([npm, "install", "--silent", "--no-audit", "--no-fund", "--prefix", str(prefix),
                                "azurite"], capture_output=True, text=True, timeout=600)
            if r.returncode != 0 or not exe.exists():
                raise RuntimeError(f"npm install azurite failed: {(r.stderr or r.stdout)[-500:]}")
    return str(exe)


@contextmanager
def local_azurite(workdir: str | Path, port: int | None = None) -> Iterator[str]:
    """Start Azurite's blob service on a free localhost port (data under ``workdir``) and point
    AZURE_STORAGE_CONNECTION_STRING (which adlfs follows) at it. ``--skipApiVersionCheck``: the current
    Azure SDK speaks an API version this Azurite refuses otherwise (a real account needs nothing of it).
    Yields the connection string."""
    exe = azurite_executable()
    port = port or free_port()
    conn = (f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};AccountKey={AZURITE_KEY};"
            f"BlobEndpoint=http://127.0.0.1:{port}/{AZURITE_ACCOUNT};")
    with _serving([exe, "--blobHost", "127.0.0.1", "--blobPort", str(port), "--location", str(workdir), "--silent",
                   "--skipApiVersionCheck"], port, "azurite-blob", {"AZURE_STORAGE_CONNECTION_STRING": conn}):
        yield conn


class TcpProxy:
    """A localhost TCP proxy in front of a server, which a test can take down (every connection cut,
    new ones refused) and bring back on the same port: an object store outage without losing its data.
    With ``latency``, each request waits that long on its way: the round trip of a real bucket."""

    def __init__(self, target_port: int, latency: float = 0.0):
        import threading

        self.target_port, self.port = target_port, free_port()
        self.latency = latency  # seconds added before each request chunk is forwarded (a far-away bucket)
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        self._server: socket.socket | None = None
        self.up()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def up(self) -> None:
        import threading

        srv = socket.socket()
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(("127.0.0.1", self.port))
        srv.listen(64)
        self._server = srv
        threading.Thread(target=self._accept, args=(srv,), daemon=True).start()

    def down(self) -> None:
        with self._lock:
            srv, self._server = self._server, None
            conns, self._conns = self._conns, []
        for s in [srv, *conns]:
            if s is not None:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()

    def _accept(self, srv: socket.socket) -> None:
        import threading

        while True:
            try:
                client, _ = srv.accept()
            except OSError:
                return  # taken down
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._server is not srv:
                    client.close()
                    upstream.close()
                    return
                self._conns += [client, upstream]
            for a, b, delay in ((client, upstream, self.latency), (upstream, client, 0.0)):
                threading.Thread(target=self._pump, args=(a, b, delay), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket, delay: float = 0.0) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if delay:
                    time.sleep(delay)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
