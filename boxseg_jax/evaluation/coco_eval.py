"""COCO evaluation (pycocotools) for ``bbox`` and ``segm``.

Predictions are COCO result dicts, one per detection::

  {"image_id": int, "category_id": int, "bbox": [x, y, w, h],
   "score": float, "segmentation": RLE dict (counts as str)}

with boxes and masks at the *original* image resolution. Images without any
prediction are fine (they simply contribute no detections).
"""

import contextlib
import io
import json
import math
from typing import Any, Dict, Iterable, List, Optional, Sequence

from etils import epath
import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")
IOU_TYPES = ("bbox", "segm")
# Mask evaluations: metric name -> prediction key holding its RLE. The two
# box-fill baselines score the same detections with each box filled as its
# mask (postprocess.to_coco_predictions(boxfill=True)).
SEGM_KEYS = {"segm": "segmentation",
             "segm_boxfill": "segmentation_boxfill",
             "segm_boxfill_grid": "segmentation_boxfill_grid"}


def encode_mask(mask: np.ndarray) -> Dict[str, Any]:
  """Binary [h, w] mask -> COCO RLE with ``counts`` as str (JSON-able)."""
  rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
  rle["counts"] = rle["counts"].decode("ascii")
  return rle


def mask_to_box(mask: np.ndarray) -> List[float]:
  """Tight COCO box [x, y, w, h] of a binary mask (zeros if empty)."""
  ys, xs = np.nonzero(mask)
  if not len(xs):
    return [0.0, 0.0, 0.0, 0.0]
  return [float(xs.min()), float(ys.min()), float(xs.max() + 1 - xs.min()),
          float(ys.max() + 1 - ys.min())]


def gt_from_source(source) -> COCO:
  """COCO ground truth for a source.

  A ``CocoSource`` evaluates against its own annotation file (crowd regions
  included, as COCO does; fields pycocotools needs but box-only files may
  lack are completed by ``_complete_annotations``); other sources
  (``shapes``, ``tfds``) are converted from their examples, with RLE masks
  when the source provides masks.
  """
  ann_file = getattr(source, "annotation_file", None)
  if ann_file is not None:
    with open(ann_file) as f:
      return coco_from_dict(_complete_annotations(json.load(f)))
  images, anns = [], []
  for i in range(len(source)):
    ex = source[i]
    h, w = ex["image"].shape[:2]
    images.append({"id": int(ex["image_id"]), "height": h, "width": w,
                   "file_name": str(ex.get("file_name", ""))})
    for j in range(len(ex["labels"])):
      x0, y0, x1, y1 = (float(v) for v in ex["boxes"][j])
      ann = {"id": len(anns) + 1, "image_id": int(ex["image_id"]),
             "category_id": int(source.category_ids[int(ex["labels"][j])]),
             "bbox": [x0, y0, x1 - x0, y1 - y0], "iscrowd": 0,
             "area": (x1 - x0) * (y1 - y0)}
      if "masks" in ex:
        rle = encode_mask(ex["masks"][j])
        ann["segmentation"] = rle
        ann["area"] = float(mask_utils.area(rle))
      anns.append(ann)
  cats = [{"id": int(c), "name": str(n)}
          for c, n in zip(source.category_ids, source.class_names)]
  return coco_from_dict({"images": images, "annotations": anns,
                         "categories": cats})


def _complete_annotations(data: Dict[str, Any]) -> Dict[str, Any]:
  """Fills ``iscrowd`` (0), ``area`` and ``id`` where an annotation lacks them.

  pycocotools reads all three for bbox evaluation too; box-only files
  (e.g. from a labelling tool) often omit them. ``area`` is the mask area
  when a segmentation exists, else the box area, as COCO defines it.
  """
  images = {img["id"]: img for img in data.get("images", [])}
  next_id = 1 + max([int(a["id"]) for a in data["annotations"]
                     if isinstance(a.get("id"), int)] + [0])
  for ann in data["annotations"]:
    ann.setdefault("iscrowd", 0)
    if "id" not in ann:
      ann["id"], next_id = next_id, next_id + 1
    if "area" not in ann:
      segm, img = ann.get("segmentation"), images.get(ann["image_id"])
      if segm and img is not None:
        h, w = img["height"], img["width"]
        if isinstance(segm, list):  # polygons (pycocotools' annToRLE)
          rle = mask_utils.merge(mask_utils.frPyObjects(segm, h, w))
        elif isinstance(segm.get("counts"), list):  # uncompressed RLE
          rle = mask_utils.frPyObjects(segm, h, w)
        else:
          rle = segm
        ann["area"] = float(mask_utils.area(rle))
      else:
        ann["area"] = float(ann["bbox"][2]) * float(ann["bbox"][3])
  return data


AGNOSTIC_CATEGORY = {"id": 1, "name": "object"}


def class_agnostic(gt: COCO) -> COCO:
  """``gt`` with every category merged into one (``AGNOSTIC_CATEGORY``).

  CutLER's evaluation protocol (reference §8): a class-agnostic detector
  is scored on box and mask AP against all objects of the dataset. The
  annotations are copied (``gt`` is unchanged); crowd regions stay crowd.
  """
  data = dict(gt.dataset)
  data["annotations"] = [dict(a, category_id=AGNOSTIC_CATEGORY["id"])
                         for a in gt.dataset["annotations"]]
  data["categories"] = [dict(AGNOSTIC_CATEGORY)]
  return coco_from_dict(data)


def coco_from_dict(data: Dict[str, Any]) -> COCO:
  gt = COCO()
  gt.dataset = data
  with contextlib.redirect_stdout(io.StringIO()):
    gt.createIndex()
  return gt


def evaluate(gt: COCO, predictions: Sequence[Dict[str, Any]], *,
             iou_types: Sequence[str] = IOU_TYPES,
             image_ids: Optional[Iterable[int]] = None
             ) -> Dict[str, Dict[str, float]]:
  """Runs COCOeval; returns {iou_type: {AP, AP50, ..., APl}} in percent.

  Args:
    gt: ground truth.
    predictions: COCO result dicts (see module doc); may be empty.
    iou_types: subset of ("bbox", "segm", "segm_boxfill",
      "segm_boxfill_grid"); a mask type scores the RLEs under its
      ``SEGM_KEYS`` key.
    image_ids: restrict to these images (default: every GT image).

  A metric that pycocotools cannot define (no GT of that size) is NaN.
  """
  img_ids = sorted(gt.getImgIds() if image_ids is None else
                   {int(i) for i in image_ids})
  wanted = set(img_ids)
  results = {}
  variant_keys = set(SEGM_KEYS.values())
  for iou_type in iou_types:
    if iou_type not in IOU_TYPES and iou_type not in SEGM_KEYS:
      raise ValueError(f"unknown iou_type {iou_type!r}")
    preds = [p for p in predictions if p["image_id"] in wanted]
    key = SEGM_KEYS.get(iou_type)
    if key is not None:
      preds = [p for p in preds if key in p]
    if not preds:
      results[iou_type] = {k: 0.0 for k in METRIC_NAMES}
      continue
    clean = []
    for p in preds:
      q = {k: v for k, v in p.items() if k not in variant_keys}
      if key is not None:
        q["segmentation"] = p[key]
      clean.append(q)
    with contextlib.redirect_stdout(io.StringIO()):
      dt = gt.loadRes(clean)
      ev = COCOeval(gt, dt, iouType="bbox" if key is None else "segm")
      ev.params.imgIds = img_ids
      ev.evaluate()
      ev.accumulate()
      ev.summarize()
    results[iou_type] = {
        k: (float("nan") if v < 0 else float(v) * 100.0)
        for k, v in zip(METRIC_NAMES, ev.stats[:6])}
  return results


def format_table(metrics: Dict[str, Dict[str, float]]) -> str:
  """Fixed-width table of ``evaluate`` output."""
  width = max([6] + [len(t) + 1 for t in metrics])
  lines = [f"{'type':<{width}}" + "".join(f"{k:>8}" for k in METRIC_NAMES)]
  for iou_type, vals in metrics.items():
    lines.append(f"{iou_type:<{width}}" + "".join(
        f"{vals[k]:8.2f}" if not math.isnan(vals[k]) else f"{'-':>8}"
        for k in METRIC_NAMES))
  return "\n".join(lines)


def write_eval(workdir: str, step: int,
               metrics: Dict[str, Dict[str, float]],
               extra: Optional[Dict[str, Any]] = None) -> str:
  """Writes ``workdir/eval/step_<step>.json`` atomically; returns its path."""
  out_dir = epath.Path(workdir) / "eval"
  out_dir.mkdir(parents=True, exist_ok=True)
  path = out_dir / f"step_{int(step)}.json"
  clean = {t: {k: (None if math.isnan(v) else v) for k, v in m.items()}
           for t, m in metrics.items()}
  payload = {"step": int(step), **clean, **(extra or {})}
  tmp = out_dir / f"step_{int(step)}.json.tmp"
  tmp.write_text(json.dumps(payload, indent=2))
  tmp.replace(path)
  return str(path)
