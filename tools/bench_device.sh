#!/usr/bin/env bash
# The issue-6 benchmarks on one accelerator, in one go, each bounded by its own timeout, so a
# short device lease is not spent on setup. Writes one JSON file per benchmark (plus its log)
# into OUT (default: $OUT when the device tool provides it, else runs/bench-device).
#
#   tools/bench_device.sh [DATA_DIR]
#
# DATA_DIR: a MiniOneRec dataset directory (valid.csv + info.txt/index.json are enough); default
# ../shared/data/minionerec/Industrial_and_Scientific, else .bench-data/Industrial_and_Scientific
# (an ignored copy made with `make bench-data` for machines that do not see ../shared).
# Runs with the Python on PATH and this checkout on PYTHONPATH (no install needed where jax,
# optax, orbax and transformers are present, as on the GPU image).
set -u -o pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
OUT_DIR="${OUT:-$ROOT/runs/bench-device}"
DATA="${1:-}"
if [ -z "$DATA" ]; then
  for candidate in "$ROOT/../shared/data/minionerec/Industrial_and_Scientific" \
                   "$ROOT/.bench-data/Industrial_and_Scientific"; do
    if [ -f "$candidate/valid.csv" ]; then DATA="$candidate"; break; fi
  done
fi
if [ -z "$DATA" ] || [ ! -f "$DATA/valid.csv" ]; then
  echo "error: no dataset directory with valid.csv (pass one, or run make bench-data)" >&2
  exit 2
fi
mkdir -p "$OUT_DIR"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export WANDB_MODE=disabled
SHAPE="${SHAPE:-qwen2.5-1.5b}"

run() {  # run NAME SECONDS ARGS...
  local name="$1" seconds="$2"
  shift 2
  echo "== $name: rec bench $*" >&2
  if timeout "$seconds" python -m rec bench "$@" >"$OUT_DIR/$name.json" 2>"$OUT_DIR/$name.log"; then
    tail -c 2000 "$OUT_DIR/$name.json"
  else
    echo "$name failed or timed out (exit $?); last lines:" >&2
    tail -n 5 "$OUT_DIR/$name.log" >&2
  fi
}

python - <<'EOF' >"$OUT_DIR/device.json" 2>/dev/null || true
import json, jax
print(json.dumps({"jax": jax.__version__, "devices": [d.device_kind for d in jax.devices()]}))
EOF

# 1. beam-search eval, 50 beams: small batch (the reference point) and large batches
run eval_b8   240 eval --shape "$SHAPE" --beams 50 --batch 8   --iters 5 --data "$DATA"
run eval_b64  240 eval --shape "$SHAPE" --beams 50 --batch 64  --iters 5 --data "$DATA"
run eval_b128 300 eval --shape "$SHAPE" --beams 50 --batch 128 --iters 3 --data "$DATA"
# 2. SFT step 16 x 512
run sft       300 sft --shape "$SHAPE" --batch 16 --seq-len 512 --iters 5
# 3. rollouts: 128 sequences, 256-token prompts, 512 new tokens, fast paths on and off
run rollout_fast  300 rollout --shape "$SHAPE" --batch 128 --prompt-len 256 --gen-len 512 --iters 2 --fast on
run rollout_plain 300 rollout --shape "$SHAPE" --batch 128 --prompt-len 256 --gen-len 512 --iters 2 --fast off
# 4. recommendation RL step: 64 prompts x 16 beams
run rl        300 rl --shape "$SHAPE" --batch 64 --beams 16 --iters 3 --data "$DATA"
echo "results in $OUT_DIR" >&2
