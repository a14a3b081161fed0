#!/usr/bin/env bash
# Create .venv (if missing) and install the project with what the demo and the tests need.
# torch is pinned to the CPU wheel 2.13.0 first: an unpinned torch pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check "torch==2.13.0"
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[qwen,dev]"
