#!/usr/bin/env python
"""Summarise and verify a shard set (the same as `distssl-inspect`; see --help)."""
import sys

from distssl.cli.inspect import main

if __name__ == "__main__":
    sys.exit(main())
