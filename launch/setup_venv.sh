#!/usr/bin/env bash
# Create the project virtualenv and install nla into it without ever pulling CUDA torch on a CPU box.
#   CPU machine (no nvidia-smi): torch==2.13.0 (local CPU wheel), then everything else pinned to it.
#   GPU machine: keeps a torch the system python already has (venv sees system site-packages);
#                otherwise installs the registry's default CUDA build, then pins it the same way.
# Override with NLA_TORCH_SPEC="torch==X.Y.Z" if you want a specific build.
set -euo pipefail
venv="${1:-.venv}"
sys_python="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
  if "$sys_python" -c "import torch" 2>/dev/null; then
    echo "[setup] system python already has torch $("$sys_python" -c 'import torch;print(torch.__version__)'); reusing it"
    "$sys_python" -m venv --system-site-packages "$venv"
  else
    "$sys_python" -m venv "$venv"
  fi
fi
py="$venv/bin/python"
"$py" -m pip install -q --upgrade pip >/dev/null

if ! "$py" -c "import torch" 2>/dev/null; then
  if [ -n "${NLA_TORCH_SPEC:-}" ]; then spec="$NLA_TORCH_SPEC"
  elif command -v nvidia-smi >/dev/null 2>&1; then spec="torch"
  else spec="torch==2.13.0"; fi
  echo "[setup] installing $spec"
  "$py" -m pip install -q "$spec"
fi
torch_version="$("$py" -c 'import torch;print(torch.__version__)')"
constraints="$venv/torch-constraints.txt"
echo "torch==${torch_version}" > "$constraints"
echo "[setup] installing nla with torch pinned to ${torch_version}"
"$py" -m pip install -q -c "$constraints" -e ".[dev]"
echo "[setup] done: $venv"
