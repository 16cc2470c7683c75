#!/usr/bin/env bash
# Install a torch build that matches the machine before vlmalign itself, so that the
# package's plain `torch>=2.4` requirement is already satisfied and pip never pulls a
# multi-GB CUDA wheel onto a CPU-only machine.
#   TORCH_SPEC   torch requirement to install (default: torch==2.13.0)
#   TORCH_INDEX  optional extra index (e.g. https://download.pytorch.org/whl/cpu)
set -euo pipefail
PY=${1:-python3}
SPEC=${TORCH_SPEC:-torch==2.13.0}
if "$PY" -c "import torch" 2>/dev/null; then
  echo "torch already installed: $("$PY" -c 'import torch; print(torch.__version__)')"
  exit 0
fi
args=()
[ -n "${TORCH_INDEX:-}" ] && args+=(--extra-index-url "$TORCH_INDEX")
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "CUDA device found: installing $SPEC (CUDA build)"
else
  echo "no CUDA device: installing $SPEC (CPU build expected)"
fi
"$PY" -m pip install -q "${args[@]}" "$SPEC"
"$PY" - <<'PYEOF'
import torch
cuda = torch.version.cuda
print(f"installed torch {torch.__version__} (cuda={cuda})")
PYEOF
