#!/usr/bin/env bash
# Idempotent virtualenv bootstrap, run on every host before training.
#   launch/bootstrap.sh [cpu|tpu|cuda]
# Re-installs only when setup.cfg changed (hash stamp in the venv).
set -euo pipefail
cd "$(dirname "$0")/.."
ACCEL="${1:-cpu}"
VENV="${VENV:-.venv}"
STAMP="$VENV/.bootstrap-$ACCEL-$(sha1sum setup.cfg | cut -c1-12)"
if [ -f "$STAMP" ]; then
  echo "bootstrap: $VENV up to date ($ACCEL)"
  exit 0
fi
[ -d "$VENV" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet -e .
JAX_VERSION=$("$VENV/bin/python" -c "import jax; print(jax.__version__)")
case "$ACCEL" in
  cpu) ;;
  tpu) "$VENV/bin/python" -m pip install --quiet "jax[tpu]==$JAX_VERSION" ;;
  cuda) "$VENV/bin/python" -m pip install --quiet "jax[cuda13]==$JAX_VERSION" ;;
  *) echo "bootstrap: unknown accelerator '$ACCEL' (cpu|tpu|cuda)" >&2; exit 2 ;;
esac
rm -f "$VENV"/.bootstrap-*
touch "$STAMP"
echo "bootstrap: installed ($ACCEL, jax $JAX_VERSION)"
