r"""Exports a trained run for inference: params, BatchNorm statistics, config.

  python -m boxseg_jax.export --workdir=out/demo --output=out/demo_export
  python -m boxseg_jax.export --workdir=out/bt --output=out/bt_teacher \
      --teacher --step=90000

Writes an Orbax checkpoint of ``{"params", "batch_stats"}`` (the student's,
or with ``--teacher`` the EMA teacher's ``ema_params`` /
``ema_batch_stats``) under ``OUTPUT/state``, the config as
``OUTPUT/config.json`` and ``OUTPUT/export.json`` (step, teacher or
student, class names and category ids, origin). No optimizer state, no
input position: ``predict --export`` and ``evaluate --export`` load it
(``train/inference_ckpt.py``). A converted ``.npz`` with ``--config`` can
be exported too (``--weights``).
"""

import json

from boxseg_jax.train import inference_ckpt


def export(model_src: inference_ckpt.InferenceModel, output: str) -> str:
  """Writes the export of ``model_src``; returns its directory."""
  return inference_ckpt.save_export(model_src, output)


def main(argv, holders, output):
  from absl import app  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise app.UsageError("Too many command-line arguments.")
  inference_ckpt.quiet_orbax()
  model_src = inference_ckpt.load_from_flags(holders)
  path = export(model_src, output.value)
  print(json.dumps({"exported": model_src.origin, "output": path,
                    "step": model_src.step, "teacher": model_src.teacher}),
        flush=True)


if __name__ == "__main__":
  import functools  # pylint: disable=g-import-not-at-top
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  _HOLDERS = inference_ckpt.define_source_flags(flags, config_flags)
  _OUTPUT = flags.DEFINE_string("output", None, "Export directory (new).")
  flags.mark_flags_as_required(["output"])
  app.run(functools.partial(main, holders=_HOLDERS, output=_OUTPUT))
