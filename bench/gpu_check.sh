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
# RL runs at RL_BATCH (2) vectors x the config's group, once with the hf engine and, when a vLLM
# environment is there (VLLM_PYTHON, default .venv-vllm/bin/python; `make vllm`), with the vllm
# engine synced each way (--rl_engine_sync adapter, merged): sync seconds and bytes, rollout
# tokens/s and step seconds from each run's metrics, and `nla plan`'s estimate for the same sizes
# next to the measured peak.
set -euo pipefail
MODEL=${MODEL:-Qwen/Qwen2.5-7B-Instruct}
CONFIG=${CONFIG:-configs/qwen2.5-7b-l20.yaml}
OUT=${OUT:-runs/gpu_check}
NLA=${NLA:-nla}
RL_BATCH=${RL_BATCH:-2}
VLLM_PYTHON=${VLLM_PYTHON:-.venv-vllm/bin/python}
PY=${PY:-python}
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
rl_sizes=(--rl_batch_size "$RL_BATCH" --rl_steps 3 --rl_save_every 3)
stage rl "${rl_sizes[@]}" --rl_val_rows 4 --rl_val_every 3
stage eval --checkpoint "$OUT/rl/final" --data "$OUT/data/test.parquet" --eval_max_rows 32
grep -h "tok/s\|steps in" "$OUT"/gpu_check.train-av.log "$OUT"/gpu_check.rl.log | tail -3

rl_numbers() {  # rl_numbers RUN_DIR: medians of the run's step metrics
  "$PY" - "$1" <<'PYEOF'
import json, statistics, sys
from pathlib import Path

import yaml

run = Path(sys.argv[1])
cfg = yaml.safe_load((run / "rl" / "config.yaml").read_text())  # flat keys, as resolved for the run
rollouts = cfg["rl_batch_size"] * cfg["rl_group_size"]
rows = [json.loads(line) for line in open(run / "metrics.jsonl") if '"rl/time_rollout_s"' in line]
med = lambda key: statistics.median(r.get(key, float("nan")) for r in rows)
step = sum(med(f"rl/time_{k}_s") for k in ("sync", "rollout", "score", "update_ar", "rewards", "update_av"))
print(f"  step {step:.2f}s: sync {med('rl/time_sync_s'):.3f}s ({med('rl/sync_bytes') / 2**20:.1f} MiB), "
      f"rollout {med('rl/time_rollout_s'):.2f}s = {med('rl/response_len') * rollouts / med('rl/time_rollout_s'):.0f} tokens/s")
PYEOF
}
echo "RL, hf engine:"; rl_numbers "$OUT"
if [ -x "$VLLM_PYTHON" ]; then
  for mode in adapter merged; do
    stage rl "${rl_sizes[@]}" --rl_val_rows 0 --output_dir "$OUT/vllm-$mode" --data_dir "$OUT/data" \
      --av_checkpoint "$OUT/av/final" --ar_checkpoint "$OUT/ar/final" \
      --rl_rollout_engine vllm --rl_engine_sync "$mode" --rl_vllm_python "$VLLM_PYTHON"
    mv "$OUT/gpu_check.rl.mem" "$OUT/gpu_check.rl-vllm-$mode.mem"
    echo "RL, vllm engine, $mode sync:"; rl_numbers "$OUT/vllm-$mode"
  done
else
  echo "no vLLM environment at $VLLM_PYTHON: the vllm engine runs skipped (make vllm, or VLLM_PYTHON=...)"
fi
echo "nla plan for the same RL sizes (trainer + engine on this GPU):"
"$NLA" plan "${common[@]}" "${rl_sizes[@]}" --rl_rollout_engine vllm \
  --gpu_memory_gb "$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1 | awk '{print $1 / 1024}')"
