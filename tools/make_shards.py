#!/usr/bin/env python
"""Build WebDataset shards from a folder or bucket of images (the same as `distssl-shards`; see --help)."""
import sys

from distssl.cli.shards import main

if __name__ == "__main__":
    sys.exit(main())
