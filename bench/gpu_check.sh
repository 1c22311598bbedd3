#!/usr/bin/env bash
# One-GPU check of the published Qwen setup at a tiny budget, in bf16: every stage runs, and the
# wall time and peak GPU memory of each are printed. Never run in CI (it needs a GPU).
#
#   bash bench/gpu_check.sh                          # Qwen/Qwen2.5-7B-Instruct via the hub or your HF cache
#   MODEL=/models/qwen2.5-7b bash bench/gpu_check.sh # a local copy (offline nodes)
#   OUT=runs/gpu_check CONFIG=configs/qwen2.5-7b-l20.yaml bash bench/gpu_check.sh
#
# The teacher is the model-free extractive one and the corpus the builtin one, so nothing but the
# model is fetched; sizes are a few steps of each stage, enough to see memory and step times.
set -euo pipefail
MODEL=${MODEL:-Qwen/Qwen2.5-7B-Instruct}
CONFIG=${CONFIG:-configs/qwen2.5-7b-l20.yaml}
OUT=${OUT:-runs/gpu_check}
NLA=${NLA:-nla}
command -v nvidia-smi >/dev/null || { echo "gpu_check: no nvidia-smi; this check needs a GPU" >&2; exit 2; }

common=(--config "$CONFIG" --model "$MODEL" --output_dir "$OUT" --device cuda --dtype bfloat16 --report_to none
        --corpus builtin:python-docs --max_docs 64 --teacher extractive)
[ -d "$MODEL" ] || common+=(--allow_hub true)

stage() {  # stage NAME ARGS...: run it, sampling GPU memory every 200 ms; print wall and peak
  local name=$1; shift
  local log="$OUT/gpu_check.$name.mem"
  mkdir -p "$OUT"
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 > "$log" &
  local sampler=$! start=$SECONDS
  "$NLA" "$name" "${common[@]}" "$@" > "$OUT/gpu_check.$name.log" 2>&1 || { kill $sampler; echo "$name FAILED: $OUT/gpu_check.$name.log"; tail -5 "$OUT/gpu_check.$name.log"; exit 1; }
  kill $sampler; wait $sampler 2>/dev/null || true
  printf '%-10s %6ss  peak GPU memory %6s MiB\n' "$name" $((SECONDS - start)) "$(sort -n "$log" | tail -1)"
}

nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
stage datagen
stage train-ar --ar_steps 10 --ar_eval_every 10 --ar_save_every 10
stage train-av --av_steps 10 --av_eval_every 10 --av_save_every 10
stage rl --rl_steps 3 --rl_save_every 3 --rl_val_rows 4 --rl_val_every 3
stage eval --checkpoint "$OUT/rl/final" --data "$OUT/data/test.parquet" --eval_max_rows 32
grep -h "tok/s\|steps in" "$OUT"/gpu_check.train-av.log "$OUT"/gpu_check.rl.log | tail -3
