r"""Writes PNGs of training batches after augmentation.

Each PNG is one example: the teacher view (geometry only) and the student
view (photometric augmentation) side by side on the padded canvas, with the
boxes (class-coloured, labelled) and, where the dataset knows them, the GT
masks overlaid (masks are for looking only; box-supervised training never
sees them). Padding is shown dark grey.

  python -m boxseg_jax.tools.visualize_data --config=configs/demo.py \
      --output=/tmp/vis --num_batches=2
  python -m boxseg_jax.tools.visualize_data --config=configs/demo.py \
      --config.data.train=coco:../shared/data/coco-mini:train2017 \
      --config.data.canvas=1344,1344 --output=/tmp/vis_coco

With ``--from_workdir`` (a training run's directory), the batches are those a
train step from that run's newest checkpoint trains on: the pseudo labels
of its teacher and, with ``pc.enabled``, Peer-assisted Copy-paste from its
memory bank (filled by the run), computed by the step's own code
(``train.step.make_preview_step``). Left: the teacher view with the GT
boxes; right: the student view after pasting, with its boxes and pseudo
masks; pasted peers are outlined white. The paste probability is the
schedule's at the checkpoint's step (``--config.pc.ramp_steps=1`` shows
the full rate):

  python -m boxseg_jax.main --config=configs/demo.py --workdir=/tmp/pc \
      --config.train.num_steps=300
  python -m boxseg_jax.tools.visualize_data --config=configs/demo.py \
      --from_workdir=/tmp/pc --output=/tmp/vis_pc --num_batches=2
"""

import logging
import os
from typing import Sequence

import jax
from absl import app
from absl import flags
from ml_collections import config_flags
from PIL import Image, ImageDraw

from boxseg_jax import cli
from boxseg_jax import config as config_lib
from boxseg_jax.data import coco
from boxseg_jax.data import pipeline
from boxseg_jax.evaluation import panels
from boxseg_jax.train import loop
from boxseg_jax.train import step as step_lib

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.",
                                          lock_config=True)
_OUTPUT = flags.DEFINE_string("output", None, "Output directory for PNGs.")
_NUM_BATCHES = flags.DEFINE_integer("num_batches", 1, "Batches to render.")
_FROM_WORKDIR = flags.DEFINE_string(
    "from_workdir", None, "A training run's directory: render the batches "
    "a step from its newest checkpoint trains on (pseudo labels, PC's "
    "paste).")
_SPLIT = flags.DEFINE_enum("split", "train", ["train", "val"],
                           "Dataset of the config to render (augmentations "
                           "are the training ones either way).")


def render_view(image, image_valid, boxes, labels, valid, masks,
                class_names):
  """One padded view with boxes and (optional) masks drawn."""
  return panels.render(image, boxes, labels, valid, masks=masks,
                       image_valid=image_valid, class_names=class_names)


def render_example(batch, i: int, class_names: Sequence[str]) -> Image.Image:
  masks = batch["masks"][i] if "masks" in batch else None
  views = []
  for key in ("image_teacher", "image"):
    views.append(render_view(batch[key][i], batch["image_valid"][i],
                             batch["boxes"][i], batch["labels"][i],
                             batch["instance_valid"][i], masks, class_names))
  w, h = views[0].size
  out = Image.new("RGB", (2 * w + 8, h + 16), (255, 255, 255))
  out.paste(views[0], (0, 16))
  out.paste(views[1], (w + 8, 16))
  draw = ImageDraw.Draw(out)
  n = int(batch["instance_valid"][i].sum())
  draw.text((2, 2), f"teacher view  id={int(batch['image_id'][i])}  "
            f"instances={n}  dropped={int(batch['num_dropped'][i])}  "
            f"truncated={int(batch['num_truncated'][i])}", fill=(0, 0, 0))
  draw.text((w + 10, 2), "student view (photometric aug)", fill=(0, 0, 0))
  if h < 400:  # small canvases (shapes demo): enlarge to be readable
    out = out.resize((out.width * 2, out.height * 2), Image.NEAREST)
  return out


def first_loadable(source, limit: int, name: str):
  """The first record that decodes; undecodable ones are skipped, logged.

  Raises ``InputError`` after ``limit`` undecodable records in a row (all of
  them when ``limit <= 0``), as the trainer does.
  """
  limit = len(source) if limit <= 0 else min(limit, len(source))
  for i in range(limit):
    try:
      return source[i]
    except coco.BadImageError as e:
      logging.warning("%s: skipping record %d: %s", name, i, e)
  raise pipeline.InputError(
      f"{name}: the first {limit} records could not be loaded. Check the "
      "dataset path and split, and that the image files are real images "
      "(not Git LFS pointers).")


def visualize(config, output: str, num_batches: int = 1,
              split: str = "train") -> list:
  """Renders ``num_batches`` batches of ``config``; returns the PNG paths."""
  config_lib.validate(config)
  spec = config.data.train if split == "train" else config.data.val
  source = pipeline.make_source(
      spec, shapes_cfg=config.data.shapes, role=split, with_masks=True,
      tfds_data_dir=config.data.tfds_data_dir or None,
      annotation_file=(config.data.train_annotations or None
                       if split == "train" else None))
  name = f"data.{split}={spec}"
  limit = config.data.max_consecutive_skips
  has_masks = "masks" in first_loadable(source, limit, name)
  # One config per canvas (data.canvases: landscape and portrait batches,
  # as the trainer draws them).
  tcfgs = config_lib.transform_configs(config,
                                       masks="full" if has_masks else None)
  batches = pipeline.TrainInput(
      source, tcfgs, batch_size=config.data.batch_size, seed=config.seed,
      num_threads=config.data.num_threads, max_consecutive_skips=limit,
      name=name)
  os.makedirs(output, exist_ok=True)
  paths = []
  for b in range(num_batches):
    batch = next(batches)
    for i in range(batch["image"].shape[0]):
      path = os.path.join(output, f"batch{b:03d}_{i:02d}.png")
      render_example(batch, i, source.class_names).save(path)
      paths.append(path)
  return paths


def visualize_student(config, workdir: str, output: str,
                      num_batches: int = 1) -> list:
  """Renders what a train step from ``workdir``'s newest checkpoint trains
  on (after the teacher's pseudo labels and PC's paste); returns the PNG
  paths. Metrics of the pasting (``pc_*``) go to the log."""
  config_lib.validate(config)
  if not step_lib.uses_teacher(config):
    raise ValueError(f"--from_workdir: method {config.method!r} has no "
                     "teacher, so its student trains on the batches the plain mode "
                     "shows (drop --from_workdir)")
  model, mesh, state = loop.restore_latest(config, workdir, "--from_workdir")
  source, batches = loop.make_train_input(config)
  preview = loop.jit_preview_step(model, config, mesh)
  _, sharding = step_lib.shardings(mesh)
  step = int(jax.device_get(state.step))
  num_gt = config.data.max_instances if config.pc.enabled else None
  os.makedirs(output, exist_ok=True)
  paths = []
  for b in range(num_batches):
    out, metrics = preview(state, loop.global_batch(next(batches), sharding))
    logging.info("batch %d from step %d: %s", b, step, ", ".join(
        f"{k} {float(v):.2f}" for k, v in metrics.items()))
    images = panels.student_batch_panels(
        loop.local_numpy(out), config.data.batch_size, source.class_names,
        num_gt=num_gt)
    for i, img in enumerate(images):
      pil = Image.fromarray(img)
      if pil.height < 400:
        pil = pil.resize((pil.width * 2, pil.height * 2), Image.NEAREST)
      path = os.path.join(output, f"student{b:03d}_{i:02d}.png")
      pil.save(path)
      paths.append(path)
  return paths


def main(argv):
  if len(argv) > 1:
    raise app.UsageError("Too many command-line arguments.")
  if _OUTPUT.value is None:
    raise app.UsageError("--output is required")
  if _FROM_WORKDIR.value:
    if _SPLIT.value != "train":
      raise app.UsageError("--from_workdir renders training batches: drop "
                           "--split")
    paths = visualize_student(_CONFIG.value, _FROM_WORKDIR.value, _OUTPUT.value,
                              _NUM_BATCHES.value)
  else:
    paths = visualize(_CONFIG.value, _OUTPUT.value, _NUM_BATCHES.value,
                      _SPLIT.value)
  print(f"wrote {len(paths)} PNGs to {_OUTPUT.value}")


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  cli.run(main, "boxseg_jax.tools.visualize_data")
