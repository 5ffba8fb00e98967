#!/usr/bin/env bash
# Rusak et al. (Table 3 setting, CIFAR-10 ResNet-18): standard vs GNT vs ANT, 3 seeds, one SLURM array.
# Usage: scripts/sweep_slurm_noise_training.sh <partition> [/path/to/cifar-10-batches-py]
# Relaunching the same command skips the jobs that already finished and resumes interrupted ones.
set -euo pipefail
partition=${1:?usage: $0 <partition> [cifar10 root]}
root=${2:-$HOME/data/cifar-10-batches-py}
cd "$(dirname "$0")/.."
.venv/bin/python -m robustexp -m \
  +method=standard,gnt,ant seed=0,1,2 \
  dataset=cifar10 dataset.root="$root" model=resnet18_cifar trainer.epochs=100 \
  logger.mode=online \
  hydra/launcher=slurm hydra.launcher.partition="$partition" hydra.launcher.timeout_min=720 \
  runtime.num_workers=8
