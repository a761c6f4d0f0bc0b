"""Docs that cannot drift: the configuration page is the schema's, every relative link and anchor in README.md
and docs/ resolves, every command the README shows names a console script, file or recipe that exists, and the
pages build as a site with mkdocs --strict."""
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

from distssl.config.recipes import resolve_config
from distssl.config.reference import markdown

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SCRIPTS = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"])


def slug(heading: str) -> str:
    """GitHub's anchor for a heading (mkdocs.yml's toc uses the same): lower case, punctuation dropped, spaces
    to hyphens, runs of hyphens kept."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {slug(m) for m in re.findall(r"^#+\s+(.*)$", text, flags=re.M)}


def test_the_configuration_page_is_the_schemas():
    assert (ROOT / "docs/configuration.md").read_text() == markdown(), \
        "docs/configuration.md is out of date: python tools/config_reference.py rewrites it"


def test_every_relative_link_and_anchor_resolves():
    broken = []
    for page in PAGES:
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+://|mailto:", target):
                continue
            path, _, fragment = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                broken.append(f"{page.relative_to(ROOT)} -> {target} (no such file)")
            elif fragment and dest.suffix == ".md" and fragment not in anchors(dest):
                broken.append(f"{page.relative_to(ROOT)} -> {target} (no such heading)")
    assert not broken, broken


def commands(page: Path) -> list[list[str]]:
    """Each command of the page's bash blocks as words (continuation lines joined, comments dropped, split at
    &&, ; and |)."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", page.read_text(), flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            if not line or line.startswith("#"):
                continue
            for part in re.split(r"&&|;|\|", line):
                words = shlex.split(part.replace("$(which ", "$(which_"), posix=True)
                if words:
                    out.append(words)
    return out


KNOWN = {"python3", "python", "pip", "deepspeed", "torchrun", "ruff", "cat", "cd", "mkdir", "export", ".", "source",
         "srun", "exec", "ray", "mkdocs", "bash"}


def test_every_command_the_readme_shows_exists():
    wrong = []
    for words in commands(ROOT / "README.md"):
        words = [w for w in words if "=" not in w or w.startswith("-")]  # VAR=value prefixes and key=value overrides
        head = words[0]
        if head not in KNOWN and head not in SCRIPTS:
            wrong.append(f"{' '.join(words)}: {head} is neither a console script nor a known tool")
        for i, w in enumerate(words):
            if w.startswith("$(which_"):
                name = w[len("$(which_"):].rstrip(")")
                if name not in SCRIPTS:
                    wrong.append(f"{' '.join(words)}: no console script {name}")
            elif w.endswith((".py", ".sh", ".yaml", ".txt")) and "/" in w and not w.startswith(("my_", "shards/")):
                if not (ROOT / w).exists():
                    wrong.append(f"{' '.join(words)}: no file {w}")
            elif w == "--config" and i + 1 < len(words):
                try:
                    resolve_config(words[i + 1])
                except Exception as e:  # noqa: BLE001 - the recipe's own error says what is missing
                    wrong.append(f"{' '.join(words)}: --config {words[i + 1]}: {e}")
            elif w in ("-c", "-r") and i + 1 < len(words) and not (ROOT / words[i + 1]).exists():
                wrong.append(f"{' '.join(words)}: no file {words[i + 1]}")
    assert commands(ROOT / "README.md") and not wrong, wrong


@pytest.mark.tool
def test_the_docs_build_as_a_site_with_mkdocs_strict(tmp_path):
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
                       cwd=ROOT, capture_output=True, text=True, env={"NO_MKDOCS_2_WARNING": "1", "PATH": ""})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert (tmp_path / "site/index.html").exists() and (tmp_path / "site/configuration/index.html").exists()
