#!/usr/bin/env bash
# The GPU device check (benchmarks/gpu_check.py): one table of training images/s and the
# fraction of the GPU's bf16 peak (cifar32, DDPM and CCUA, bf16 + channels_last, compile off
# and on), DDIM-100 + CFG sampling images/s and Inception feature images/s. Under 8 minutes
# on one H100/H200-class GPU. Extra arguments go to the script (e.g. --peak-tflops 989).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
exec timeout 470 python3 benchmarks/gpu_check.py "$@"
