#!/usr/bin/env bash
# timm and a torchvision for the tests of timm vision towers, installed into a side folder that
# only those tests put on their path (tests/integration/timm_env.py says why: with torchvision
# importable, transformers prefers torchvision image processors to the PIL ones every other test
# and the quickstart use). Users who compose timm towers install timm into their own environment
# as usual (pip install timm), with the torchvision that matches their torch.
#   $1  the python of the venv (default: python3)
#   $2  the folder (default: .venv/timm-site)
set -euo pipefail
PY=${1:-python3}
SITE=${2:-.venv/timm-site}
# torchvision 0.N pairs with torch 2.(N-15): 0.28 with torch 2.13
TV=$("$PY" -c "import torch; print(f'0.{int(torch.__version__.split(\".\")[1]) + 15}.*')")
rm -rf "$SITE"
"$PY" -m pip install -q --no-deps --target "$SITE" "torchvision==$TV" "timm==1.0.31"
echo "timm and torchvision==$TV in $SITE"
