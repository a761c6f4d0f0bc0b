#!/usr/bin/env bash
# Rewrite constraints.txt from the environment the suite just passed in (run from the repository root, in the venv
# the README's test command made): every installed package at its version, but distssl itself and torch's CUDA
# libraries (they follow torch's own pins).
set -euo pipefail
{
  sed -n '1,3p' constraints.txt
  python -m pip freeze --exclude-editable | grep -v -E '^(distssl|nvidia-|triton|cuda-)|^-e |@ file'
} > constraints.txt.new
mv constraints.txt.new constraints.txt
echo "constraints.txt: $(grep -vc '^#' constraints.txt) packages"
