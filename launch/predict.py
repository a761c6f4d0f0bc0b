#!/usr/bin/env python
"""Predict a model's labels for a bucket (the same as `distssl-predict`; see --help)."""
import sys

from distssl.cli.predict import main

if __name__ == "__main__":
    sys.exit(main())
