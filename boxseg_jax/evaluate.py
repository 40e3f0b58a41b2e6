r"""COCO evaluation of a trained run, an export or converted weights.

  python -m boxseg_jax.evaluate --workdir=out/demo            # latest step
  python -m boxseg_jax.evaluate --workdir=out/demo --step=2000
  python -m boxseg_jax.evaluate --export=out/demo_export
  python -m boxseg_jax.evaluate --config=configs/NAME.py \
      --weights=weights/boxinst_r50_1x.npz --output=out/boxinst_eval

bbox and segm AP (plus the box-fill baselines, ``eval.boxfill_baselines``)
on ``config.data.val`` through ``train.evaluate.Evaluator``, the evaluator
of the training loop, so the numbers are those a training run writes.
Prints the table and writes ``OUTPUT/eval/step_<N>.json`` (``--output``
defaults to the workdir or the export). Only parameters and BatchNorm
statistics are read (``train/inference_ckpt.py``), never optimizer state.
``--set=eval.num_images=50`` overrides config values (or, with
``--config``, ``--config.eval.num_images=50``).
"""

import json
import logging
import math
import os
from typing import Any, Dict

import jax

from boxseg_jax.data import pipeline
from boxseg_jax.train import evaluate as eval_lib
from boxseg_jax.train import inference_ckpt
from boxseg_jax.train import models
from boxseg_jax.train import step as step_lib


def progress_eval_step(evaluator, total: int, desc: str):
  """Wraps ``evaluator.eval_step`` so each batch advances a tqdm bar."""
  import tqdm  # pylint: disable=g-import-not-at-top
  bar = tqdm.tqdm(total=total, desc=desc, unit="batch", dynamic_ncols=True)
  inner = evaluator.eval_step

  def step(*args):
    out = inner(*args)
    bar.update(1)
    return out

  evaluator.eval_step = step
  return bar


def evaluate(model_src: inference_ckpt.InferenceModel,
             output: str) -> Dict[str, Any]:
  """Evaluates an ``InferenceModel``; writes ``output/eval/step_<N>.json``.

  Returns:
    ``{iou_type: {AP, AP50, ...}}`` as ``Evaluator.run`` returns it.
  """
  config = model_src.config
  mesh = step_lib.make_mesh(config.train.num_devices)
  evaluator = eval_lib.Evaluator(config, models.build_model(config), mesh,
                                 output)
  batches = pipeline.eval_batch_count(
      evaluator.source, len(evaluator.tcfgs),
      batch_size=config.data.eval_batch_size // jax.process_count(),
      shard_count=jax.process_count())
  bar = progress_eval_step(evaluator, batches, f"evaluate {config.data.val}")
  try:
    return evaluator.run(model_src.state(), model_src.step)
  finally:
    bar.close()


def _json_safe(metrics):
  return {t: {k: (None if isinstance(v, float) and math.isnan(v) else v)
              for k, v in m.items()} for t, m in metrics.items()}


def main(argv, holders, output_flag):
  from absl import app  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise app.UsageError("Too many command-line arguments.")
  inference_ckpt.quiet_orbax()
  model_src = inference_ckpt.load_from_flags(holders)
  output = (output_flag.value or holders["workdir"].value or
            holders["export"].value)
  if not output:
    raise app.UsageError("--weights needs --output (where eval/ goes)")
  logging.info("Evaluating %s", model_src.origin)
  metrics = evaluate(model_src, output)
  path = os.path.join(output, "eval", f"step_{model_src.step}.json")
  print(json.dumps({"evaluated": model_src.origin, "eval_json": path,
                    "metrics": _json_safe(metrics)}), flush=True)


if __name__ == "__main__":
  import functools  # pylint: disable=g-import-not-at-top
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  _HOLDERS = inference_ckpt.define_source_flags(flags, config_flags)
  _OUTPUT = flags.DEFINE_string(
      "output", None, "Where eval/step_<N>.json goes (default: the workdir "
      "or the export).")
  app.run(functools.partial(main, holders=_HOLDERS, output_flag=_OUTPUT))
