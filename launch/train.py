#!/usr/bin/env python
"""Train (the same as `distssl-train`; see --help)."""
import sys

from distssl.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
