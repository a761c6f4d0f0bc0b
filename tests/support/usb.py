"""The authors' code for the parity tests: USB (PyPI ``semilearn`` 0.3.2, by the FlexMatch, FreeMatch and
SoftMatch authors), its algorithm and hook modules loaded by path.

semilearn's package ``__init__`` files import its trainer, data sets and loggers (transformers, torchaudio,
scikit-learn, aim, wandb), so nothing of it is imported as a package. Its ``AlgorithmBase`` is replaced by
:class:`Harness`, which holds only the plumbing a ``train_step`` calls (``call_hook``, the loss modules, the
log dict); every line of maths a parity test compares runs from semilearn's own files: the algorithms'
``train_step`` and their hooks (masking, thresholds, distribution alignment, pseudo-labels) and its
criterions. The wheel comes from an installed ``semilearn`` of that version, or is fetched once with
``pip download --no-deps`` into a cache folder.
"""
from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import os
import subprocess
import sys
import types
import zipfile
from collections import OrderedDict
from pathlib import Path

import torch

VERSION = "0.3.2"
CACHE = Path(os.environ.get("DISTSSL_TEST_CACHE", Path.home() / ".cache" / "distssl-tests")) / f"semilearn-{VERSION}"


def source_dir() -> Path:
    """The folder of semilearn's package: an installed one of VERSION, else the wheel unpacked in CACHE."""
    spec = importlib.util.find_spec("semilearn")  # finds without importing its __init__
    if spec is not None and spec.submodule_search_locations:
        try:
            if importlib.metadata.version("semilearn") == VERSION:
                return Path(list(spec.submodule_search_locations)[0])
        except importlib.metadata.PackageNotFoundError:
            pass
    package = CACHE / "semilearn"
    if not (package / "algorithms").is_dir():
        CACHE.mkdir(parents=True, exist_ok=True)
        r = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                            f"semilearn=={VERSION}", "-d", str(CACHE)], capture_output=True, text=True)
        wheels = sorted(CACHE.glob(f"semilearn-{VERSION}-*.whl"))
        if r.returncode != 0 or not wheels:
            raise RuntimeError(f"pip download --no-deps semilearn=={VERSION} failed (the parity tests need the "
                               f"authors' code; or pip install --no-deps semilearn=={VERSION}): {r.stderr[-300:]}")
        with zipfile.ZipFile(wheels[0]) as z:
            z.extractall(CACHE)
    return package


class _Registry(dict):
    """semilearn.core.utils.ALGORITHMS: ``@ALGORITHMS.register(name)`` keeps the class."""

    def register(self, name):
        def keep(cls):
            self[name] = cls
            return cls
        return keep


class _NoBatchNorm:
    """The models the parity tests forward have no BatchNorm: USB's freeze/unfreeze have nothing to do."""

    def freeze_bn(self, model):
        pass

    def unfreeze_bn(self, model):
        pass


class Harness:
    """Stands in for semilearn's AlgorithmBase: the attributes and plumbing a ``train_step`` reads. Built with
    :func:`make`, never by its constructor."""

    use_cat = True
    distributed, world_size = False, 1
    amp_cm = staticmethod(contextlib.nullcontext)

    def set_hooks(self):
        pass

    def register_hook(self, hook, name=None, priority="NORMAL"):
        self.hooks_dict[name or type(hook).__name__] = hook

    def registered_hook(self, hook_name):
        return hook_name in self.hooks_dict

    def call_hook(self, fn_name, hook_name=None, *args, **kwargs):  # AlgorithmBase.call_hook, one hook
        return getattr(self.hooks_dict[hook_name], fn_name)(self, *args, **kwargs)

    def compute_prob(self, logits):
        return torch.softmax(logits, dim=-1)

    def process_out_dict(self, out_dict=None, **kwargs):
        return {**(out_dict or {}), **kwargs}

    def process_log_dict(self, log_dict=None, prefix="train", **kwargs):
        return {**(log_dict or {}), **{f"{prefix}/{k}": v for k, v in kwargs.items()}}


def _package(name: str, path: Path, **attrs) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__path__ = [str(path)]
    module.__dict__.update(attrs)
    sys.modules[name] = module
    return module


def _load(name: str, path: Path) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path, submodule_search_locations=[str(path.parent)]
                                                  if path.name == "__init__.py" else None)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


class Reference(types.SimpleNamespace):
    """semilearn's modules by name (``fixmatch``, ``freematch``, ..., ``hooks``, ``criterions``)."""

    def make(self, name: str, *, num_classes: int, model, lambda_u: float = 1.0, it: int = 0,
             num_train_iter: int = 100, args=None, **attrs):
        """semilearn's algorithm ``name`` without its constructor (which builds data sets, nets and optimizers):
        the attributes its ``train_step`` reads, the loss modules from semilearn's own criterions, its
        ``init(...)`` keys as ``attrs``, then its own ``set_hooks``."""
        module = getattr(self, name)
        cls = next(v for v in vars(module).values() if isinstance(v, type) and issubclass(v, Harness)
                   and v is not Harness and v.__module__ == module.__name__)
        alg = cls.__new__(cls)
        alg.__dict__.update(num_classes=num_classes, model=model, lambda_u=lambda_u, it=it,
                            num_train_iter=num_train_iter, hooks_dict=OrderedDict(), bn_controller=_NoBatchNorm(),
                            ce_loss=self.criterions.CELoss(), consistency_loss=self.criterions.ConsistencyLoss(),
                            gpu=None, args=types.SimpleNamespace(**(args or {})), **attrs)
        alg.set_hooks()
        return alg


def load(root: Path) -> Reference:
    """semilearn's algorithm and hook modules, loaded from ``root`` with their imports of semilearn's heavy
    parts stubbed; sys.modules is left as it was."""
    saved = {k: sys.modules.pop(k) for k in list(sys.modules) if k == "semilearn" or k.startswith("semilearn.")}
    try:
        _package("semilearn", root)
        core = _package("semilearn.core", root / "core", AlgorithmBase=Harness)
        sys.modules["semilearn.core.algorithmbase"] = types.SimpleNamespace(AlgorithmBase=Harness)
        core.utils = _package("semilearn.core.utils", root / "core/utils", ALGORITHMS=_Registry())
        hook = _load("semilearn.core.hooks.hook", root / "core/hooks/hook.py")
        _package("semilearn.core.hooks", root / "core/hooks", Hook=hook.Hook)
        out = Reference(criterions=_load("semilearn.core.criterions", root / "core/criterions/__init__.py"))
        _package("semilearn.algorithms", root / "algorithms")
        _load("semilearn.algorithms.utils", root / "algorithms/utils/__init__.py")
        out.hooks = _load("semilearn.algorithms.hooks", root / "algorithms/hooks/__init__.py")
        for name in ("fixmatch", "flexmatch", "freematch", "softmatch", "uda", "pimodel", "meanteacher", "vat",
                     "mixmatch", "remixmatch"):
            setattr(out, name, _load(f"semilearn.algorithms.{name}", root / f"algorithms/{name}/__init__.py"))
            setattr(out, name, sys.modules[f"semilearn.algorithms.{name}.{name}"])
        return out
    finally:
        for k in [k for k in sys.modules if k == "semilearn" or k.startswith("semilearn.")]:
            del sys.modules[k]
        sys.modules.update(saved)
