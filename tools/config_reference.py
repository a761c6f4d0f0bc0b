#!/usr/bin/env python
"""Rewrite docs/configuration.md from the config schema (distssl.config.reference)."""
from pathlib import Path

from distssl.config.reference import markdown

path = Path(__file__).resolve().parents[1] / "docs/configuration.md"
path.write_text(markdown())
print(f"{path}: {len(markdown().splitlines())} lines")
