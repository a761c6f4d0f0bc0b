"""The package as a cluster image installs it: a wheel, not an editable checkout, run from an empty folder
with the recipes and DeepSpeed templates it ships."""
import os
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT, launch_env, tiny_overrides

RECIPES = ["demo", "starter", "cifar10", "imagenet", "vit_finetune"]
# Each module of the installed package imported first, as a user's script may (a package __init__ that
# re-exports, imported on the way to a submodule, can close a cycle that no module's imports show).
EACH_MODULE_ALONE = """
import importlib, pkgutil, sys
import distssl
names = sorted(['distssl'] + [m.name for m in pkgutil.walk_packages(distssl.__path__, 'distssl.')])
print(' '.join(names))
for name in names:
    for loaded in [m for m in sys.modules if m == 'distssl' or m.startswith('distssl.')]:
        del sys.modules[loaded]
    importlib.import_module(name)
print(len(names), 'modules imported')
"""


def test_recipes_resolve_by_name_by_checkout_path_and_as_files(tmp_path, monkeypatch):
    from distssl.config import recipes
    from distssl.errors import ConfigError

    monkeypatch.chdir(tmp_path)  # no configs/ here
    assert set(RECIPES) <= set(recipes.names()) and recipes.names("tune") == ["demo"]
    assert recipes.resolve_config("demo") == str(recipes.RECIPES / "demo.yaml")
    assert recipes.resolve_config("configs/demo.yaml") == str(recipes.RECIPES / "demo.yaml")
    assert recipes.resolve_config("demo", kind="tune") == str(recipes.RECIPES / "tune/demo.yaml")
    own = tmp_path / "demo.yaml"
    own.write_text("train: {steps: 3}\n")
    assert recipes.resolve_config("demo.yaml") == "demo.yaml"  # a file the user has wins over the name
    with pytest.raises(ConfigError, match="--config demoo: no such file, and no shipped train recipe .*demo"):
        recipes.resolve_config("demoo")
    assert recipes.template_path(None, 3) == recipes.TEMPLATES / "zero3.json"
    assert recipes.template_path("configs/deepspeed/zero2_bf16.json", 2) == recipes.TEMPLATES / "zero2_bf16.json"
    assert recipes.template_path("zero2_bf16", 2) == recipes.TEMPLATES / "zero2_bf16.json"


@pytest.fixture(scope="module")
def installed_wheel(tmp_path_factory) -> str:
    """pip wheel of a copy of the checkout (an in-tree build would leave build/ behind), installed
    without dependencies into a folder of its own: the dependencies are this venv's."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    keep = {"distssl", "configs", "pyproject.toml", "README.md"}
    src.mkdir()
    for name in keep:
        path = ROOT / name
        if path.is_dir() and not path.is_symlink():
            shutil.copytree(path, src / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(path, src / name, follow_symlinks=False)
    pip = [sys.executable, "-m", "pip"]
    r = subprocess.run([*pip, "wheel", "-q", "--no-deps", "--no-build-isolation", str(src), "-w", str(tmp / "dist")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    (wheel,) = (tmp / "dist").glob("distssl-*.whl")
    r = subprocess.run([*pip, "install", "-q", "--no-deps", "--target", str(tmp / "site"), str(wheel)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return str(tmp / "site")


def _from_empty_folder(site: str, cwd, *args, timeout=300) -> subprocess.CompletedProcess:
    env = {**launch_env(), "PYTHONPATH": site}
    return subprocess.run([sys.executable, "-m", "distssl.cli.train", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env=env)


@pytest.mark.slow
def test_the_wheel_trains_from_an_empty_folder_with_its_shipped_recipe(installed_wheel, tiny_data, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    r = subprocess.run([sys.executable, "-c", "import distssl; print(distssl.__file__)"], capture_output=True,
                       text=True, cwd=empty, env={**os.environ, "PYTHONPATH": installed_wheel})
    assert r.stdout.startswith(installed_wheel), r.stdout  # the installed copy, not the checkout
    r = subprocess.run([sys.executable, "-c", EACH_MODULE_ALONE], capture_output=True, text=True, cwd=empty,
                       env={**launch_env(), "PYTHONPATH": installed_wheel}, timeout=300)
    assert r.returncode == 0 and "modules imported" in r.stdout, r.stdout[-1500:] + r.stderr[-1500:]
    checkout = {str(f.relative_to(ROOT))[:-3].replace("/", ".").removesuffix(".__init__")
                for f in (ROOT / "distssl").rglob("*.py")}
    assert set(r.stdout.split("\n")[0].split()) == checkout  # the wheel holds every module of the checkout
    for name in RECIPES:  # starter names no data: printed with the keys still to set marked
        r = _from_empty_folder(installed_wheel, empty, "--config", name, "--print-config")
        assert r.returncode == 0 and "zero_stage:" in r.stdout, (name, r.stderr[-1500:])
        assert ("labeled: ''  # NOT SET" in r.stdout) == (name == "starter"), name
    r = _from_empty_folder(installed_wheel, empty, "--config", "starter")
    assert r.returncode == 2 and "data.labeled is not set" in r.stderr, r.stderr[-1500:]
    run = tmp_path / "run"
    r = _from_empty_folder(installed_wheel, empty, "--config", "demo",
                           *tiny_overrides(tiny_data, run, **{"train.steps": 2, "train.eval_every": 2}))
    assert r.returncode == 0, r.stderr[-3000:]
    assert (run / "model.safetensors").exists() and list(empty.iterdir()) == []  # nothing written where it ran
