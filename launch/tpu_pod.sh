#!/usr/bin/env bash
# Train on a Cloud TPU pod: copy the code to every worker, bootstrap the venv
# (idempotent), start one process per host with jax.distributed.
#
#   launch/tpu_pod.sh --tpu=NAME --zone=ZONE [--project=ID] [--dry-run] -- \
#       --config=configs/coco_boxinst_r50_1x.py --workdir=gs://BUCKET/run1
#
# The workdir must be shared by all hosts (a gs:// path). TFDS_DATA_DIR is
# passed through when set.
set -euo pipefail
TPU="" ZONE="" PROJECT="" DRY=0 REMOTE_DIR="boxseg_jax"
while [ $# -gt 0 ]; do
  case "$1" in
    --tpu=*) TPU="${1#*=}" ;;
    --zone=*) ZONE="${1#*=}" ;;
    --project=*) PROJECT="${1#*=}" ;;
    --remote_dir=*) REMOTE_DIR="${1#*=}" ;;
    --dry-run) DRY=1 ;;
    --) shift; break ;;
    *) echo "tpu_pod.sh: unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
[ -n "$TPU" ] && [ -n "$ZONE" ] || { echo "tpu_pod.sh: --tpu and --zone are required" >&2; exit 2; }
[ $# -gt 0 ] || { echo "tpu_pod.sh: pass trainer flags after --" >&2; exit 2; }
GC=(gcloud compute tpus tpu-vm)
COMMON=(--zone="$ZONE" --worker=all)
[ -n "$PROJECT" ] && COMMON+=(--project="$PROJECT")
ARGS=$(printf ' %q' "$@")
ENVS="BOXSEG_DISTRIBUTED=1"
[ -n "${TFDS_DATA_DIR:-}" ] && ENVS="$ENVS TFDS_DATA_DIR=$(printf '%q' "$TFDS_DATA_DIR")"
REMOTE="cd ~/$REMOTE_DIR && bash launch/bootstrap.sh tpu && $ENVS .venv/bin/python -m boxseg_jax.main$ARGS"
run() {
  if [ "$DRY" = 1 ]; then printf '%q ' "$@"; echo; else "$@"; fi
}
cd "$(dirname "$0")/.."
run "${GC[@]}" scp --recurse boxseg_jax configs launch setup.cfg pyproject.toml README.md "$TPU:~/$REMOTE_DIR/" "${COMMON[@]}"
run "${GC[@]}" ssh "$TPU" "${COMMON[@]}" --command="$REMOTE"
