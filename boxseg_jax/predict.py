r"""Runs a model on images: overlay PNGs and a COCO results JSON.

  python -m boxseg_jax.predict --workdir=out/demo \
      --images='photos/*.jpg' --output=out/pred
  python -m boxseg_jax.predict --export=out/demo_export \
      --images=coco:../shared/data/coco-mini:val2017 --output=out/pred
  python -m boxseg_jax.predict --config=configs/NAME.py \
      --weights=weights/boxinst_r50_1x.npz --images='photos/*' --output=...

``--images`` is a glob (or a directory: every image file in it) or a
dataset name ``coco:ROOT:SPLIT``. Images of any size and aspect are resized
as evaluation does (short side ``data.test_short_size``, long side at most
``data.test_max_size``, shrunk to fit ``data.canvas``, or with
``data.canvases`` the canvas of the image's orientation, read from the file
header or the COCO JSON without decoding); results are at the original
resolution, in the order of the images. Writes, under ``--output``:

* ``<name>.png``: the image with masks, boxes, class names and scores of
  the detections with score >= ``--score_thresh``;
* ``predictions.json``: the same detections as COCO results (``image_id``,
  ``category_id``, ``bbox`` [x, y, w, h], ``score``, RLE
  ``segmentation``);
* ``images.json``: a COCO dataset of the images (no annotations) so that
  ``COCO("images.json").loadRes("predictions.json")`` works; with
  ``coco:`` input the image ids are the dataset's, so the results also load
  against its annotation file.
"""

import copy
import dataclasses
import glob
import json
import logging
import os
from typing import Any, Dict, List, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import PartitionSpec as P
from PIL import Image
from pycocotools import mask as mask_utils

from boxseg_jax import config as config_lib
from boxseg_jax.data import coco
from boxseg_jax.data import pipeline
from boxseg_jax.evaluation import panels
from boxseg_jax.evaluation import postprocess
from boxseg_jax.train import inference_ckpt
from boxseg_jax.train import models
from boxseg_jax.train import step as step_lib

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff",
                    ".webp")


class ImageFiles:
  """Random-access source of image files without annotations."""

  def __init__(self, paths: Sequence[str]):
    self.paths = list(paths)
    self.image_ids = list(range(1, len(self.paths) + 1))

  def __len__(self) -> int:
    return len(self.paths)

  def image_size(self, index: int):
    """(height, width) from the file header (the pixels are not decoded)."""
    path = self.paths[index]
    try:
      with Image.open(path) as img:
        w, h = img.size
    except FileNotFoundError:
      raise
    except Exception as e:  # PIL raises many types for corrupt files.
      raise coco.BadImageError(f"{path}: cannot read image size ({e})"
                               ) from e
    return h, w

  def __getitem__(self, index: int):
    image = coco.load_image(self.paths[index])
    return {"image": image, "boxes": np.zeros((0, 4), np.float32),
            "labels": np.zeros((0,), np.int32),
            "image_id": self.image_ids[index],
            "file_name": self.paths[index]}


def image_source(spec: str):
  """``coco:ROOT:SPLIT`` -> CocoSource; a glob or directory -> ImageFiles."""
  if spec.startswith("coco:"):
    return pipeline.make_source(spec, role="val")
  pattern = os.path.join(spec, "*") if os.path.isdir(spec) else spec
  paths = sorted(p for p in glob.glob(os.path.expanduser(pattern))
                 if os.path.isfile(p) and
                 p.lower().endswith(IMAGE_EXTENSIONS))
  if not paths:
    raise FileNotFoundError(f"--images={spec}: no image files ("
                            f"{', '.join(IMAGE_EXTENSIONS)})")
  return ImageFiles(paths)


def first_images(source, n: int):
  """The first ``n`` images of a source from ``image_source``."""
  if isinstance(source, ImageFiles):
    return ImageFiles(source.paths[:n])
  source = copy.copy(source)
  source.records = source.records[:n]
  return source


def _record(source, index: int) -> Dict[str, Any]:
  """(image id, file path, height, width) without decoding (if known)."""
  if isinstance(source, ImageFiles):
    return {"id": source.image_ids[index], "path": source.paths[index]}
  rec = source.records[index]
  return {"id": rec["image_id"],
          "path": os.path.join(source.image_dir, rec["file_name"])}


@dataclasses.dataclass
class Prediction:
  """One image's kept detections (COCO results) and where it came from."""
  image_id: int
  path: str
  height: int
  width: int
  results: List[Dict[str, Any]]


def predict(model_src: inference_ckpt.InferenceModel, source, *,
            score_thresh: float = 0.3, progress: bool = True,
            max_images: int = -1) -> List[Prediction]:
  """Detections of every image of ``source`` (single process)."""
  config = model_src.config
  mesh = step_lib.make_mesh(config.train.num_devices)
  eval_step = step_lib.jit_eval_step(
      step_lib.make_eval_fn(models.build_model(config), config), mesh)
  tcfgs = config_lib.transform_configs(config, masks=None)
  _, data_sharding = step_lib.shardings(mesh)
  bs = config.data.eval_batch_size
  if bs % mesh.devices.size:
    raise ValueError(f"data.eval_batch_size={bs} not divisible by "
                     f"{mesh.devices.size} devices")
  if 0 < max_images < len(source):
    source = first_images(source, max_images)
  index_of = {_record(source, i)["id"]: i for i in range(len(source))}
  category_ids = model_src.category_ids
  bar = None
  if progress:
    import tqdm  # pylint: disable=g-import-not-at-top
    bar = tqdm.tqdm(total=len(source), desc="predict", unit="img",
                    dynamic_ncols=True)
  out: List[Prediction] = []
  params, stats = model_src.params, model_src.batch_stats
  # With data.canvases the batches come grouped by orientation (one canvas
  # each, one compilation per canvas); ``out`` is put back in source order.
  for batch in pipeline.eval_batches(source, tcfgs, batch_size=bs,
                                     num_threads=config.data.num_threads):
    image = jax.make_array_from_process_local_data(data_sharding,
                                                   batch["image"])
    dets = eval_step(params, stats, image)
    dets = multihost_utils.global_array_to_host_local_array(
        dets, mesh, P("data"))
    dets = jax.tree.map(np.asarray, dets)
    for i in np.nonzero(batch["example_valid"])[0]:
      one = {k: v[i] for k, v in dets.items()}
      image_id = int(batch["image_id"][i])
      h, w = (int(x) for x in batch["orig_size"][i])
      results = postprocess.to_coco_predictions(
          one, image_id=image_id,
          resized_size=tuple(batch["resized_size"][i]), orig_size=(h, w),
          label_to_category_id=category_ids,
          rescore=bool(config.eval.rescore))
      results = [r for r in results if r["score"] >= score_thresh]
      rec = _record(source, index_of[image_id])
      out.append(Prediction(image_id, rec["path"], h, w, results))
      if bar is not None:
        bar.update(1)
  if bar is not None:
    bar.close()
  out.sort(key=lambda p: index_of[p.image_id])
  missing = len(source) - len(out)
  if missing:
    logging.warning("%d image(s) could not be decoded and were skipped",
                    missing)
  return out


def render(pred: Prediction, class_names: Sequence[str],
           category_ids: Sequence[int]) -> Image.Image:
  """The original image with ``pred``'s masks, boxes, names and scores."""
  image = coco.load_image(pred.path)
  n = len(pred.results)
  label_of = {int(c): i for i, c in enumerate(category_ids)}
  boxes = np.zeros((n, 4), np.float32)
  labels = np.zeros((n,), np.int64)
  scores = np.zeros((n,), np.float32)
  masks = np.zeros((n,) + image.shape[:2], bool)
  for j, r in enumerate(pred.results):
    x, y, bw, bh = r["bbox"]
    boxes[j] = (x, y, x + bw, y + bh)
    labels[j] = label_of[int(r["category_id"])]
    scores[j] = r["score"]
    if "segmentation" in r:
      masks[j] = mask_utils.decode(r["segmentation"]).astype(bool)
  # Lowest score first, so the best detection is drawn on top.
  order = np.argsort(scores, kind="stable")
  return panels.render(image, boxes[order], labels[order],
                       np.ones((n,), bool), masks=masks[order],
                       class_names=class_names, scores=scores[order],
                       font_size=max(10, min(image.shape[:2]) // 30))


def _png_names(preds: Sequence[Prediction]) -> List[str]:
  stems = [os.path.splitext(os.path.basename(p.path))[0] for p in preds]
  counts: Dict[str, int] = {}
  for s in stems:
    counts[s] = counts.get(s, 0) + 1
  return [f"{s}.png" if counts[s] == 1 else f"{s}_{p.image_id}.png"
          for s, p in zip(stems, preds)]


def write_outputs(preds: Sequence[Prediction], output: str, *,
                  class_names: Sequence[str], category_ids: Sequence[int],
                  pngs: bool = True, progress: bool = True) -> Dict[str, str]:
  """PNGs, ``predictions.json`` and ``images.json`` under ``output``."""
  os.makedirs(output, exist_ok=True)
  results = [r for p in preds for r in p.results]
  images = [{"id": p.image_id, "file_name": p.path, "height": p.height,
             "width": p.width} for p in preds]
  cats = [{"id": int(c), "name": str(n)}
          for c, n in zip(category_ids, class_names)]
  paths = {"predictions": os.path.join(output, "predictions.json"),
           "images": os.path.join(output, "images.json")}
  for key, payload in (("predictions", results),
                       ("images", {"images": images, "annotations": [],
                                   "categories": cats})):
    tmp = paths[key] + ".tmp"
    with open(tmp, "w") as f:
      json.dump(payload, f)
    os.replace(tmp, paths[key])
  if pngs:
    items = list(zip(preds, _png_names(preds)))
    if progress:
      import tqdm  # pylint: disable=g-import-not-at-top
      items = tqdm.tqdm(items, desc="overlays", unit="img",
                        dynamic_ncols=True)
    for pred, name in items:
      render(pred, class_names, category_ids).save(
          os.path.join(output, name))
  return paths


def main(argv, holders, images, output, score_thresh, max_images, pngs):
  from absl import app  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise app.UsageError("Too many command-line arguments.")
  inference_ckpt.quiet_orbax()
  model_src = inference_ckpt.load_from_flags(holders)
  source = image_source(images.value)
  logging.info("Predicting %d images with %s", len(source), model_src.origin)
  preds = predict(model_src, source, score_thresh=score_thresh.value,
                  max_images=max_images.value)
  paths = write_outputs(preds, output.value,
                        class_names=model_src.class_names,
                        category_ids=model_src.category_ids,
                        pngs=pngs.value)
  num = sum(len(p.results) for p in preds)
  print(json.dumps({"model": model_src.origin, "num_images": len(preds),
                    "detections": num, "score_thresh": score_thresh.value,
                    **paths}), flush=True)


if __name__ == "__main__":
  import functools  # pylint: disable=g-import-not-at-top
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  _HOLDERS = inference_ckpt.define_source_flags(flags, config_flags)
  _IMAGES = flags.DEFINE_string("images", None, "Glob, directory or "
                                "coco:ROOT:SPLIT.")
  _OUTPUT = flags.DEFINE_string("output", None, "Output directory.")
  _SCORE = flags.DEFINE_float("score_thresh", 0.3, "Keep (draw and write) "
                              "detections with at least this score.")
  _MAX = flags.DEFINE_integer("max_images", -1, "Only the first N images.")
  _PNGS = flags.DEFINE_bool("pngs", True, "Write overlay PNGs.")
  flags.mark_flags_as_required(["images", "output"])
  app.run(functools.partial(main, holders=_HOLDERS, images=_IMAGES,
                            output=_OUTPUT, score_thresh=_SCORE,
                            max_images=_MAX, pngs=_PNGS))
