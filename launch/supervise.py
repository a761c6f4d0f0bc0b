#!/usr/bin/env python
"""Run a training command as a container's command (the same as `distssl-supervise`; see --help)."""
import sys

from distssl.cli.supervise import main

if __name__ == "__main__":
    sys.exit(main())
