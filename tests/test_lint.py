"""The linter sees the whole package: an exclude that matches a package folder by name (a bare ``data`` in
``extend-exclude`` skipped distssl/data/, and ruff's default ``dist`` skipped distssl/dist/) hides its
errors from ``ruff check .`` without a word."""
import subprocess
from pathlib import Path

import pytest
from ruff.__main__ import find_ruff_bin

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.tool
def test_ruff_checks_every_module_of_the_package():
    listed = subprocess.run([find_ruff_bin(), "check", "--show-files", "."], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout.splitlines()
    checked = {Path(line.strip()).resolve() for line in listed if line.strip().endswith(".py")}
    modules = sorted(p.resolve() for p in (ROOT / "distssl").rglob("*.py"))
    unseen = [str(p.relative_to(ROOT)) for p in modules if p not in checked]
    assert modules and not unseen, f"ruff check . does not look at: {unseen}"
