#!/usr/bin/env bash
# The prepared check for a machine with one GPU (issue 21): CUDA tests, engine CUDA vs CPU agreement and
# throughput, ResNet-50 evaluation with / without BN adaptation (bf16, channels_last), an AMP step, a
# 1-process nccl DDP run, certification throughput, peak memory of each. One JSON + markdown report in
# bench/results/gpu_check.{json,md} (and docs/gpu_check.md with --out docs/gpu_check.md). Budget: about
# 8 minutes on one GPU. Without a GPU it runs the CPU-side parts at small sizes, says so, and exits 0.
#
#   bash scripts/gpu_check.sh [--quick] [--out docs/gpu_check.md]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
[ -x "$PY" ] || PY=python3
exec timeout 900 "$PY" scripts/gpu_check.py "$@"
