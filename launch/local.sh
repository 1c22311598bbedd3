#!/usr/bin/env bash
# One stage on this machine:  launch/local.sh STAGE CONFIG [--key value ...]
#   NPROC=8 launch/local.sh rl configs/qwen2.5-7b-l20.yaml --output_dir runs/qwen
#   ACCEL=launch/accelerate/fsdp_8gpu.yaml launch/local.sh train-av configs/llama-3.3-70b-l53.yaml
# Without a GPU, NPROC>1 uses the CPU/gloo recipe (launch/accelerate/cpu_2proc.yaml).
set -euo pipefail
stage="${1:?usage: launch/local.sh STAGE CONFIG [--key value ...]}"
config="${2:?usage: launch/local.sh STAGE CONFIG [--key value ...]}"
shift 2
nproc="${NPROC:-1}"
here="$(cd "$(dirname "$0")" && pwd)"
if [ "$nproc" = "1" ] && [ -z "${ACCEL:-}" ]; then
  exec nla "$stage" --config "$config" "$@"
fi
if [ -z "${ACCEL:-}" ]; then
  if command -v nvidia-smi >/dev/null 2>&1; then ACCEL="$here/accelerate/ddp_8gpu.yaml"
  else ACCEL="$here/accelerate/cpu_2proc.yaml"; export OMP_NUM_THREADS=1; fi
fi
exec accelerate launch --config_file "$ACCEL" --num_processes "$nproc" -m nla.cli "$stage" --config "$config" "$@"
