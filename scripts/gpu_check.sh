#!/usr/bin/env bash
# The GPU validation run, one command on a bare GPU machine from a fresh clone:
#
#   bash scripts/gpu_check.sh                 # about 10-20 minutes on one GPU; runs/gpu_check/gpu_check.{json,md}
#   bash scripts/gpu_check.sh --only qlora_sft,zero3_sft --out runs/gpu_check_2
#   bash scripts/gpu_check.sh --cpu-smoke     # a machine without CUDA: the CPU checks, the rest "skipped: no CUDA"
#
# `make setup-dev` creates .venv (a CUDA torch where nvidia-smi sees a GPU: scripts/install_torch.sh)
# with vlmalign and its dev extras (trl); each check then installs what else it needs
# (bitsandbytes, deepspeed, flash-attn, vllm in a venv of its own) and reports pass, fail,
# missing dependency or skipped. Arguments go to scripts/gpu_check.py (--help lists them).
set -euo pipefail
cd "$(dirname "$0")/.."
make setup-dev
HF_HUB_OFFLINE=1 exec .venv/bin/python scripts/gpu_check.py "$@"
