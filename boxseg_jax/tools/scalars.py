r"""Prints logged scalars of a workdir as a table (TensorBoard event files).

  python -m boxseg_jax.tools.scalars --workdir=out/demo_boxteacher \
      --keys=loss,pseudo_iou,pseudo_fraction --every=500

Reads `workdir/events.out.tfevents.*` (the trainer's CLU writer, process
0); `--keys` empty lists the keys present.
"""

import glob
import os
from typing import Dict, List, Sequence

from absl import app
from absl import flags

from boxseg_jax import cli
from boxseg_jax import console

_WORKDIR = flags.DEFINE_string("workdir", None, "Training work directory.")
_KEYS = flags.DEFINE_list("keys", [], "Scalar names (empty: list them).")
_EVERY = flags.DEFINE_integer("every", 0, "Only steps divisible by this.")


def read_scalars(workdir: str) -> Dict[str, Dict[int, float]]:
  """``{key: {step: value}}`` of every scalar in the workdir's events."""
  files = sorted(glob.glob(os.path.join(workdir, "events.out.tfevents.*")))
  if not files:
    raise FileNotFoundError(f"{workdir}: no events.out.tfevents.* files "
                            "(is it a training workdir?)")
  with console.quiet_stderr():
    from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
  out: Dict[str, Dict[int, float]] = {}
  for path in files:
    acc = event_accumulator.EventAccumulator(
        path, size_guidance={"tensors": 0, "scalars": 0})
    acc.Reload()
    for key in acc.Tags()["tensors"]:
      for ev in acc.Tensors(key):
        value = tf.make_ndarray(ev.tensor_proto)
        if value.ndim == 0 and value.dtype.kind in "fiu":
          out.setdefault(key, {})[int(ev.step)] = float(value)
  return out


def table(scalars: Dict[str, Dict[int, float]], keys: Sequence[str],
          every: int = 0) -> str:
  missing = [k for k in keys if k not in scalars]
  if missing:
    raise KeyError(f"no scalar {missing}; have {sorted(scalars)}")
  steps = sorted(set().union(*(scalars[k] for k in keys)))
  if every:
    steps = [s for s in steps if s % every == 0]
  lines: List[str] = ["step".rjust(8) + "".join(k.rjust(20) for k in keys)]
  for s in steps:
    cells = [f"{scalars[k][s]:.4f}" if s in scalars[k] else "-"
             for k in keys]
    lines.append(f"{s:8d}" + "".join(c.rjust(20) for c in cells))
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError("Too many command-line arguments.")
  scalars = read_scalars(_WORKDIR.value)
  if not _KEYS.value:
    print("\n".join(sorted(scalars)))
    return
  print(table(scalars, _KEYS.value, _EVERY.value))


if __name__ == "__main__":
  flags.mark_flag_as_required("workdir")
  cli.run(main, "boxseg_jax.tools.scalars")
