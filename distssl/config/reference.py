"""docs/configuration.md, generated from the schema (the same rows ``distssl-train --keys`` prints), so the page
cannot drift from the keys the code declares: ``python tools/config_reference.py`` rewrites it, and
tests/test_docs.py fails when it differs."""
from __future__ import annotations

import json

from distssl.config.coerce import describe_keys
from distssl.config.tree import Config

HEADER = """# Configuration

One typed tree loaded from YAML (`--config PATH` or a shipped recipe's name: `demo`, `starter`, `cifar10`,
`imagenet`, `vit_finetune`), with `key=value` overrides on the command line (`ssl.tau=0.9`,
`"data.labeled=[a,b]"`). Unknown keys (with the nearest known one), wrong types and out-of-range values
stop the launch with one line naming the key, before any process starts. `distssl-train --keys [PREFIX]`
prints what this page lists; `distssl-train --config demo --print-config` prints a resolved tree.

This page is generated from the schema (`python tools/config_reference.py`); a test fails when it drifts.
"""


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown() -> str:
    """The page: each section's keys in one table (a section's own keys first, then its subsections')."""
    sections: dict[str, tuple[str, list[str]]] = {}
    for key, type_name, default, meaning in describe_keys(Config):
        if type_name == "section":
            sections[key] = (meaning, [])
            continue
        sections[key.rsplit(".", 1)[0]][1].append(
            f"| `{key}` | `{_cell(json.dumps(default))}` | {_cell(type_name)} | {_cell(meaning)} |")
    out = [HEADER]
    for name, (meaning, rows) in sections.items():
        out.append(f"\n{'#' * min(name.count('.') + 2, 4)} `{name}`\n\n{_cell(meaning)}\n\n"
                   f"| key | default | type | meaning |\n|---|---|---|---|")
        out += rows
    return "\n".join(out) + "\n"
