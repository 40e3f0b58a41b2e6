r"""The segm AP a perfect CondInst could reach on a config's val set.

CondInst predicts masks on a stride-4 grid of the resized image and pastes
them back to the original size (bilinear upsampling, threshold 0.5), so
even perfect boxes, labels and masks lose the detail below that grid. This
tool feeds the GT itself through that output path and evaluates it with
pycocotools against the full-resolution GT:

* ``point``: the GT mask read at the grid points (the targets a
  mask-supervised head is trained on);
* ``area``: the GT mask averaged over each grid cell (a soft prediction,
  the best a probability map can do).

Boxes, labels and scores are the GT's, so bbox AP is 100 and the segm AP is
the ceiling of the mask format at this resolution.

  python -m boxseg_jax.tools.mask_ceiling --config=configs/demo.py
"""

import json
from typing import Dict

from absl import flags
from ml_collections import config_flags
import numpy as np

from boxseg_jax import cli
from boxseg_jax import config as config_lib
from boxseg_jax.data import pipeline
from boxseg_jax.evaluation import coco_eval
from boxseg_jax.evaluation import postprocess

def _grid(masks: np.ndarray, stride: int, mode: str) -> np.ndarray:
  """``[n, H, W]`` canvas masks -> ``[n, H/s, W/s]`` float grid."""
  m = masks.astype(np.float32)
  if mode == "point":
    return m[:, stride // 2::stride, stride // 2::stride]
  n, h, w = m.shape
  return m.reshape(n, h // stride, stride, w // stride, stride).mean((2, 4))


def ceiling(config, stride: int = 4) -> Dict[str, Dict[str, float]]:
  """``{"point": metrics, "area": metrics}`` on ``config.data.val``.

  The val set must have a GT mask on every instance (an error naming the
  file otherwise: the ceiling of a box-only set means nothing).
  """
  config_lib.validate(config)
  source = pipeline.make_source(
      config.data.val, shapes_cfg=config.data.shapes, role="val",
      with_masks=True, require_masks=True,
      tfds_data_dir=config.data.tfds_data_dir or None)
  gt = coco_eval.gt_from_source(source)
  # One config per canvas: with data.canvases each orientation on its own.
  tcfgs = config_lib.transform_configs(config, masks="full")
  results = {"point": [], "area": []}
  for batch in pipeline.eval_batches(
      source, tcfgs, batch_size=config.data.eval_batch_size,
      num_threads=config.data.num_threads):
    for i in np.nonzero(batch["example_valid"])[0]:
      valid = batch["instance_valid"][i]
      if not valid.any():
        continue
      det = {"boxes": batch["boxes"][i][valid],
             "labels": batch["labels"][i][valid],
             "scores": np.ones(int(valid.sum()), np.float32),
             "valid": np.ones(int(valid.sum()), bool)}
      for mode, res in results.items():
        res += postprocess.to_coco_predictions(
            dict(det, mask_probs=_grid(batch["masks"][i][valid], stride,
                                       mode)),
            image_id=int(batch["image_id"][i]),
            resized_size=tuple(batch["resized_size"][i]),
            orig_size=tuple(batch["orig_size"][i]),
            label_to_category_id=source.category_ids, mask_stride=stride)
  return {mode: coco_eval.evaluate(gt, res) for mode, res in results.items()}


def main(argv):
  del argv
  stride = flags.FLAGS.stride
  out = ceiling(flags.FLAGS.config, stride)
  for mode, metrics in out.items():
    print(f"GT through the stride-{stride} mask path ({mode}):\n"
          f"{coco_eval.format_table(metrics)}")
  if flags.FLAGS.output:
    with open(flags.FLAGS.output, "w") as f:
      json.dump({"stride": stride, **out}, f, indent=2)


if __name__ == "__main__":
  # Flags are defined only for the CLI, so importing this module (tests,
  # other tools) never collides with another tool's --config/--output.
  config_flags.DEFINE_config_file("config", None, "Config file.")
  flags.DEFINE_integer("stride", 4, "Mask grid stride.")
  flags.DEFINE_string("output", "", "Optional JSON output path.")
  flags.mark_flags_as_required(["config"])
  cli.run(main, "boxseg_jax.tools.mask_ceiling")
