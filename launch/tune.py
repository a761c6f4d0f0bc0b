#!/usr/bin/env python
"""Ray Tune sweep over the training config (the same as `distssl-tune`; see --help)."""
import sys

from distssl.cli.tune import main

if __name__ == "__main__":
    sys.exit(main())
