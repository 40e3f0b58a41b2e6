#!/usr/bin/env bash
# Train on this machine: one process (all local devices), or N processes
# joined with jax.distributed over localhost (to test multi-host setups).
#
#   launch/local.sh [--processes=N] [--port=PORT] [--cpu_devices=K] \
#       [--dry-run] -- --config=configs/demo.py --workdir=/tmp/demo
#
# --cpu_devices=K forces K CPU devices per process (XLA host platform).
set -euo pipefail
PROCS=1 PORT=12355 CPU_DEVICES="" DRY=0
while [ $# -gt 0 ]; do
  case "$1" in
    --processes=*) PROCS="${1#*=}" ;;
    --port=*) PORT="${1#*=}" ;;
    --cpu_devices=*) CPU_DEVICES="${1#*=}" ;;
    --dry-run) DRY=1 ;;
    --) shift; break ;;
    *) echo "local.sh: unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
[ $# -gt 0 ] || { echo "local.sh: pass trainer flags after --" >&2; exit 2; }
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
ENV=()
[ -n "$CPU_DEVICES" ] && ENV+=("XLA_FLAGS=--xla_force_host_platform_device_count=$CPU_DEVICES")
if [ "$PROCS" = 1 ]; then
  CMD=(env "${ENV[@]}" "$PY" -m boxseg_jax.main "$@")
  if [ "$DRY" = 1 ]; then printf '%q ' "${CMD[@]}"; echo; exit 0; fi
  exec "${CMD[@]}"
fi
PIDS=()
for ((i = 0; i < PROCS; i++)); do
  CMD=(env "${ENV[@]}" "$PY" -m boxseg_jax.main --distributed
       --coordinator_address="localhost:$PORT" --num_processes="$PROCS"
       --process_id="$i" "$@")
  if [ "$DRY" = 1 ]; then printf '%q ' "${CMD[@]}"; echo; continue; fi
  "${CMD[@]}" > "/tmp/boxseg_local_p$i.log" 2>&1 &
  PIDS+=($!)
done
[ "$DRY" = 1 ] && exit 0
STATUS=0
for p in "${PIDS[@]}"; do wait "$p" || STATUS=1; done
for ((i = 0; i < PROCS; i++)); do echo "== process $i: /tmp/boxseg_local_p$i.log"; tail -n 5 "/tmp/boxseg_local_p$i.log"; done
exit $STATUS
