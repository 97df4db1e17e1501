#!/usr/bin/env bash
# The device check of the shard loop, for a machine with a GPU and torch but no Ray (see gpu_check.py):
# 28x28 images (a Fig. 6 block's real size) and digits (8x8: the shortest steps), fp32 and bf16, then 1, 2
# and 4 processes sharing the GPU. About 3 minutes on one H200; every part is cut off well inside 8.
# Figures go to $OUT (the device tool's folder) or ./gpu_check_out: gpu_check_*.json and a log.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu_check_out}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
{
  date -u +%FT%TZ
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || echo "no nvidia-smi"
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
  timeout 270 python3 benchmarks/gpu_check.py --out "$out/28x28" --shape 1x28x28 --images 12800 --blocks 10 --epochs 2
  timeout 150 python3 benchmarks/gpu_check.py --out "$out/digits" --shape digits --blocks 10 --epochs 4 --processes 1 2
} 2>&1 | tee "$out/gpu_check.log"
