#!/usr/bin/env python
"""Self-training rounds (the same as `distssl-selftrain`; see --help)."""
import sys

from distssl.cli.selftrain import main

if __name__ == "__main__":
    sys.exit(main())
