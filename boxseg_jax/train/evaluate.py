"""Periodic/final COCO evaluation inside a run (all processes cooperate).

Each process runs the jitted ``eval_step`` on its slice of the val set
(padded to equal batch counts), turns its own detections into COCO results
on the host (paste to the original size, RLE), and, with several processes,
writes them to ``workdir/eval/preds_step_<N>.p<i>.json``; process 0 merges,
evaluates with pycocotools and writes ``eval/step_<N>.json`` (a shared
workdir is required for multi-host runs, as for checkpoints).
"""

import json
import logging
from typing import Any, Dict, List, Optional, Set, Tuple

import jax
from etils import epath
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import PartitionSpec as P

from boxseg_jax import config as config_lib
from boxseg_jax.data import coco
from boxseg_jax.data import pipeline
from boxseg_jax.evaluation import coco_eval
from boxseg_jax.evaluation import panels
from boxseg_jax.evaluation import postprocess
from boxseg_jax.train import step as step_lib


class Subset:
  """The first ``n`` records of a source."""

  def __init__(self, source, n: int):
    self.source, self.n = source, min(n, len(source))
    self.category_ids = source.category_ids
    self.class_names = source.class_names
    self.annotation_file = None  # evaluate against these images only

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    if not 0 <= i < self.n:
      raise IndexError(i)
    return self.source[i]

  def image_size(self, i):
    """The source's ``image_size`` (orientation canvases, no decoding)."""
    if not 0 <= i < self.n:
      raise IndexError(i)
    return pipeline.image_size(self.source, i)


def _images_with_masks(gt) -> Tuple[Set[int], bool]:
  """(ids of images whose annotations all have a segmentation, any mask)."""
  covered = set(gt.getImgIds())
  any_mask = False
  for ann in gt.dataset["annotations"]:
    if coco.has_segmentation(ann.get("segmentation")):
      any_mask = True
    else:
      covered.discard(ann["image_id"])
  return covered, any_mask


class Evaluator:
  """Runs COCO evaluation of the student (or teacher) on ``config.data.val``.
  """

  def __init__(self, config: ml_collections.ConfigDict, model, mesh,
               workdir: str):
    self.config = config
    self.mesh = mesh
    self.workdir = workdir
    source = pipeline.make_source(
        config.data.val, shapes_cfg=config.data.shapes, role="val",
        with_masks=False, tfds_data_dir=config.data.tfds_data_dir or None)
    self.image_ids: Optional[List[int]] = None
    if config.eval.num_images > 0 and config.eval.num_images < len(source):
      if getattr(source, "annotation_file", None):
        self.image_ids = [source.records[i]["image_id"]
                          for i in range(config.eval.num_images)]
        full = source
        source = Subset(source, config.eval.num_images)
        source.annotation_file = full.annotation_file
      else:
        source = Subset(source, config.eval.num_images)
    self.source = source
    self.class_agnostic = bool(config.eval.class_agnostic)
    if self.class_agnostic:
      # Every prediction counts as the one merged category.
      self.category_ids = (coco_eval.AGNOSTIC_CATEGORY["id"],) * (
          config.model.num_classes)
    else:
      config_lib.check_num_classes(config, source,
                                   f"data.val={config.data.val}")
      self.category_ids = tuple(source.category_ids)
    self._gt = None
    # {iou_type: image ids or None (all)}; decided before training when
    # the run evaluates, so a val set without masks is known up front.
    self.plan: Optional[Dict[str, Optional[List[int]]]] = None
    if config.train.eval_at_end or config.train.eval_every_steps:
      self.plan = self._plan()
    # One per canvas (data.canvases: landscape, portrait); eval_batches
    # groups the images by orientation, one canvas per batch, and
    # ``eval_step`` compiles once per canvas.
    self.tcfgs = config_lib.transform_configs(config, masks=None)
    self.eval_step = step_lib.jit_eval_step(
        step_lib.make_eval_fn(model, config), mesh)

  @property
  def gt(self):
    if self._gt is None:
      src = self.source
      if getattr(src, "annotation_file", None) is not None:
        self._gt = coco_eval.gt_from_source(src)  # read from the file
      else:  # converted from the examples: with their masks, this once
        inner = getattr(src, "source", src)
        old = getattr(inner, "with_masks", None)
        if old is not None:
          inner.with_masks = True
        try:
          self._gt = coco_eval.gt_from_source(src)
        finally:
          if old is not None:
            inner.with_masks = old
      if self.class_agnostic:
        self._gt = coco_eval.class_agnostic(self._gt)
    return self._gt

  @property
  def iou_types(self):
    """bbox, segm and (``eval.boxfill_baselines``) the two box-fill APs."""
    types = coco_eval.IOU_TYPES
    if self.config.eval.boxfill_baselines:
      types += ("segm_boxfill", "segm_boxfill_grid")
    return types

  def _plan(self) -> Dict[str, Optional[List[int]]]:
    """{iou_type: image ids}: bbox on all, mask types where GT has masks."""
    name = f"data.val={self.config.data.val}"
    covered, any_mask = _images_with_masks(self.gt)
    ids = self.gt.getImgIds() if self.image_ids is None else self.image_ids
    segm = [i for i in ids if i in covered]
    mask_ids = self.image_ids
    if not any_mask or not segm:
      logging.warning("%s: no annotation has a segmentation (box-only "
                      "annotations): evaluating bbox only, no segm AP.", name)
      return {"bbox": self.image_ids}
    if len(segm) < len(ids):
      logging.warning(
          "%s: %d of %d images have annotations without a segmentation; "
          "segm AP is computed on the other %d images only (bbox AP on "
          "all).", name, len(ids) - len(segm), len(ids), len(segm))
      mask_ids = segm
    return {t: (self.image_ids if t == "bbox" else mask_ids)
            for t in self.iou_types}

  def evaluate(self, results) -> Dict[str, Dict[str, float]]:
    """pycocotools metrics of ``results`` following ``self.plan``."""
    if self.plan is None:
      self.plan = self._plan()
    metrics: Dict[str, Dict[str, float]] = {}
    for iou_type, ids in self.plan.items():
      metrics.update(coco_eval.evaluate(self.gt, results,
                                        iou_types=(iou_type,),
                                        image_ids=ids))
    return metrics

  def predict(self, params, batch_stats, *, panel_count: int = 0):
    """COCO results of this process' images (+ panels of the first batch)."""
    _, data_sharding = step_lib.shardings(self.mesh)
    num_proc, proc = jax.process_count(), jax.process_index()
    bs = self.config.data.eval_batch_size
    if bs % self.mesh.devices.size:
      raise ValueError(f"data.eval_batch_size={bs} not divisible by "
                       f"{self.mesh.devices.size} devices")
    results, images = [], []
    for batch in pipeline.eval_batches(
        self.source, self.tcfgs, batch_size=bs // num_proc,
        shard_index=proc, shard_count=num_proc,
        num_threads=self.config.data.num_threads):
      image = jax.make_array_from_process_local_data(data_sharding,
                                                     batch["image"])
      dets = self.eval_step(params, batch_stats, image)
      dets = multihost_utils.global_array_to_host_local_array(
          dets, self.mesh, P("data"))
      dets = jax.tree.map(np.asarray, dets)
      for i in np.nonzero(batch["example_valid"])[0]:
        one = {k: v[i] for k, v in dets.items()}
        results += postprocess.to_coco_predictions(
            one, image_id=int(batch["image_id"][i]),
            resized_size=tuple(batch["resized_size"][i]),
            orig_size=tuple(batch["orig_size"][i]),
            label_to_category_id=self.category_ids,
            rescore=self.config.eval.rescore,
            boxfill=self.config.eval.boxfill_baselines)
        if len(images) < panel_count:
          images.append(self._panel(batch, i, one))
    return results, images

  def _panel(self, batch, i, det) -> np.ndarray:
    s = 4
    masks = det["mask_probs"] > 0.5
    masks = np.repeat(np.repeat(masks, s, axis=1), s, axis=2)
    keep = det["valid"] & (det["scores"] >= 0.3)
    return np.asarray(panels.render(
        batch["image"][i], det["boxes"], det["labels"], keep, masks=masks,
        image_valid=batch["image_valid"][i],
        class_names=(("object",) * len(self.category_ids)
                     if self.class_agnostic else self.source.class_names),
        scores=det["scores"]))

  def run(self, state, step: int, writer=None) -> Dict[str, Any]:
    """Evaluates ``state`` and writes ``eval/step_<step>.json``."""
    if self.config.eval.use_teacher:
      params, stats = state.ema_params, state.ema_batch_stats
    else:
      params, stats = state.params, state.batch_stats
    results, images = self.predict(params, stats,
                                   panel_count=self.config.eval.num_panels)
    if jax.process_count() > 1:
      out_dir = epath.Path(self.workdir) / "eval"
      out_dir.mkdir(parents=True, exist_ok=True)
      mine = out_dir / f"preds_step_{step}.p{jax.process_index()}.json"
      tmp = out_dir / (mine.name + ".tmp")
      tmp.write_text(json.dumps(results))
      tmp.replace(mine)
      multihost_utils.sync_global_devices(f"eval_preds_{step}")
      if jax.process_index() == 0:
        results = []
        for p in range(jax.process_count()):
          path = out_dir / f"preds_step_{step}.p{p}.json"
          results += json.loads(path.read_text())
    metrics: Dict[str, Any] = {}
    if jax.process_index() == 0:
      metrics = self.evaluate(results)
      path = coco_eval.write_eval(self.workdir, step, metrics,
                                  {"num_predictions": len(results)})
      logging.info("Evaluation at step %d (%s):\n%s", step, path,
                   coco_eval.format_table(metrics))
      print(f"step {step} evaluation ({path}):\n"
            f"{coco_eval.format_table(metrics)}", flush=True)
      if writer is not None:
        writer.write_scalars(step, {f"eval/{t}_{k}": v
                                    for t, m in metrics.items()
                                    for k, v in m.items()})
        if images:
          writer.write_images(step, {"eval/panels": np.stack(images)})
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"eval_done_{step}")
    return metrics
