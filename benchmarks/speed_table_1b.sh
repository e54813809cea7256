#!/bin/bash
# The 1B step of every method as `leanlora train` runs it by default (`*_auto` rows: base and
# CUDA graph left to the library), with PEFT's strongest setup (bf16 adapters, per-layer compile)
# timed in the same run, so every ratio compares rows of one machine. Each row runs in its own
# process under its own time limit (compiling the bank + gates + bits step takes minutes), and
# appends its JSON line to one file, so a row that runs out of time loses only itself.
#
#   bash benchmarks/speed_table_1b.sh [OUT_DIR] [ROW:SECONDS ...]
#
# Default rows: PEFT, then LoRA, DyLoRA, VB-LoRA, B-LoRA, QLoRA, QDyLoRA and bank + gates + bits
# on NF4. Extra speed.py options go in SPEED_ARGS (e.g. SPEED_ARGS="--nf4-rebuild triton"; later
# options win), the interpreter in PYTHON (default python3).
set -u
out=${1:-speed_1b}
shift $(( $# > 0 ? 1 : 0 ))
rows=("$@")
if [ ${#rows[@]} -eq 0 ]; then
  rows=(peft_lora_bf16@compiled:100 lean_lora_auto@graphed:110 lean_dylora_auto@graphed:110
        lean_vblora_auto@graphed:110 lean_blora_auto@graphed:160 lean_qlora_auto@graphed:110
        lean_qdylora_auto@graphed:110 lean_combo_auto@graphed:300)
fi
mkdir -p "$out"
here=$(dirname "$0")
common="--preset 1b --optimizer fused --lean-optimizer leanlora --warmup 3 --steps 8 --timing late"
for entry in "${rows[@]}"; do
  row=${entry%:*} limit=${entry##*:}
  echo "== $row (limit ${limit} s)"
  # shellcheck disable=SC2086  # SPEED_ARGS is a list of options
  timeout "$limit" "${PYTHON:-python3}" -u "$here/speed.py" $common ${SPEED_ARGS:-} --rows "$row" --out "$out/speed.jsonl" \
    || echo "== $row: exit $? (124: over its limit)"
done
