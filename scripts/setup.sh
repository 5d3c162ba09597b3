#!/usr/bin/env bash
# One-time setup of a fresh machine: .venv with phiconvert and every toolchain that shares the main environment,
# pinned by constraints.txt, plus the managed GPTQ environment (its transformers pin conflicts with optimum-intel's).
# Rerunning is cheap: pip reuses its wheel cache (llama-cpp-python compiles from source only the first time).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
# torch==2.13.0 first and pinned: a bare `torch` requirement pulls a multi-GB CUDA build.
.venv/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt torch==2.13.0 -e ".[all,dev]"
# optimum-intel requires an unpinned torchvision whose PyPI build breaks `import transformers` beside CPU torch.
.venv/bin/python -m pip uninstall -y -q torchvision
# The GPTQ/AWQ toolchain's own environment, under the user cache (reused when already there).
.venv/bin/phiconvert setup gptq > /dev/null
