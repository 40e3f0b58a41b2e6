#!/usr/bin/env bash
# Train on multi-GPU hosts under SLURM: one process per GPU, jax.distributed
# reads the coordinator, process count and id from SLURM's environment.
#
#   launch/slurm_gpu.sh --nodes=2 --gpus_per_node=8 [--partition=P]
#       [--time=72:00:00] [--dry-run] -- --config=... --workdir=/shared/run1
#
# Submits with sbatch (the workdir must be on a shared filesystem).
set -euo pipefail
NODES=1 GPUS=8 PARTITION="" TIME="72:00:00" DRY=0
while [ $# -gt 0 ]; do
  case "$1" in
    --nodes=*) NODES="${1#*=}" ;;
    --gpus_per_node=*) GPUS="${1#*=}" ;;
    --partition=*) PARTITION="${1#*=}" ;;
    --time=*) TIME="${1#*=}" ;;
    --dry-run) DRY=1 ;;
    --) shift; break ;;
    *) echo "slurm_gpu.sh: unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
[ $# -gt 0 ] || { echo "slurm_gpu.sh: pass trainer flags after --" >&2; exit 2; }
cd "$(dirname "$0")/.."
ARGS=$(printf ' %q' "$@")
SB=(sbatch --job-name=boxseg --nodes="$NODES" --ntasks-per-node="$GPUS"
    --gpus-per-task=1 --cpus-per-task=8 --time="$TIME")
[ -n "$PARTITION" ] && SB+=(--partition="$PARTITION")
# bootstrap once per node (idempotent; srun --ntasks-per-node=1), then train.
WRAP="srun --ntasks-per-node=1 bash launch/bootstrap.sh cuda && srun env BOXSEG_DISTRIBUTED=1 .venv/bin/python -m boxseg_jax.main$ARGS"
if [ "$DRY" = 1 ]; then
  printf '%q ' "${SB[@]}" --wrap="$WRAP"; echo
else
  "${SB[@]}" --wrap="$WRAP"
fi
