"""The console entry points answer --help as the scripts do (the same parser, another program name)."""
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

SCRIPTS = {"distssl-train": "launch/train.py", "distssl-tune": "launch/tune.py",
           "distssl-shards": "tools/make_shards.py", "distssl-export": "tools/export_model.py",
           "distssl-inspect": "tools/inspect_shards.py", "distssl-supervise": "launch/supervise.py",
           "distssl-predict": "launch/predict.py", "distssl-selftrain": "launch/selftrain.py"}


@pytest.mark.slow
@pytest.mark.parametrize("command", sorted(SCRIPTS))
def test_entry_point_help_is_the_scripts_help(command):
    exe = Path(sys.executable).parent / command
    assert exe.exists(), f"{command} is not installed: pip install -e ."
    mine = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=120)
    script = subprocess.run([sys.executable, str(ROOT / SCRIPTS[command]), "--help"], capture_output=True, text=True,
                            timeout=120)
    assert mine.returncode == script.returncode == 0, mine.stderr + script.stderr
    def words(text, prog):  # the usage line wraps by the program name's length
        return text.replace(prog, "PROG", 1).split()
    assert words(mine.stdout, command) == words(script.stdout, Path(SCRIPTS[command]).name)
    assert len(mine.stdout.splitlines()) > 5  # a real description, not just usage
