#!/usr/bin/env bash
# One run on 4 GPUs of one node (DDP, one process per GPU, ranks from SLURM), bf16 autocast and channels_last.
# Usage: scripts/sweep_slurm_ddp.sh <partition> /path/to/imagenet
set -euo pipefail
partition=${1:?usage: $0 <partition> <imagenet root>}
root=${2:?imagenet root (ImageFolder layout: train/<wnid>/*.JPEG, val/<wnid>/*.JPEG)}
cd "$(dirname "$0")/.."
.venv/bin/python -m robustexp -m \
  +method=gnt dataset=imagenet dataset.root="$root" model=torchvision model.arch=resnet50 \
  trainer.batch_size=64 runtime.amp=bf16 runtime.channels_last=true runtime.num_workers=8 \
  runtime.persistent_workers=true \
  hydra/launcher=slurm hydra.launcher.partition="$partition" \
  hydra.launcher.gpus_per_node=4 hydra.launcher.tasks_per_node=4 hydra.launcher.cpus_per_task=10
