#!/usr/bin/env bash
# The same kind of sweep on this machine through submitit_local (each job its own process): the
# dress rehearsal of a SLURM sweep. Relaunch it to see finished jobs skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/python -m robustexp -m +method=standard,gnt seed=0,1 hydra/launcher=local "$@"
