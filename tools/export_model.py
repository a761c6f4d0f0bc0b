#!/usr/bin/env python
"""Export a run's EMA weights for timm (the same as `distssl-export`; see --help)."""
import sys

from distssl.cli.export import main

if __name__ == "__main__":
    sys.exit(main())
