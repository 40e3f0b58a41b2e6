"""`coco:ROOT:SPLIT`: the standard COCO layout as a random-access source.

``ROOT/annotations/instances_SPLIT.json`` and ``ROOT/SPLIT/<file_name>``.
Annotations are read once at construction; images are decoded on access.

Rules (detectron2's COCO loader, made explicit and counted):
* ``iscrowd=1`` regions never become instances (counted in ``num_crowd``);
  pycocotools evaluation still sees them through the annotation file.
* Boxes with NaN/inf coordinates, negative or zero width/height are dropped
  and counted (``num_bad_boxes``); boxes are clipped to the image.
* Category ids map to contiguous labels in increasing id order.
* Images listed in the JSON whose file is missing are skipped at construction
  and counted (``missing_files``); images that fail to decode raise
  ``BadImageError`` naming the file (the pipeline skips and counts them).
* Grayscale, RGBA, palette and 16-bit images are converted to 8-bit RGB.

Errors at construction, naming the file (and the id): duplicate image or
annotation ids (the second image would train with the first one's boxes
and evaluation would merge them), a malformed ``segmentation`` (anything
pycocotools cannot turn into a mask of the image's size), a file without
any usable instance, and, with ``require_masks`` (mask supervision), an
instance without a segmentation. Annotations whose ``image_id`` is not in
``images`` are ignored, counted (``unlisted_annotations``) and logged with
their first ids. Box-only files (no ``segmentation``) are fine otherwise.
"""

import collections
import json
import logging
import math
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from boxseg_jax.data import features


class BadImageError(ValueError):
  """An image file that exists but cannot be decoded."""


def load_image(path: str) -> np.ndarray:
  """Decodes ``path`` to uint8 RGB [h, w, 3]; BadImageError names the file."""
  try:
    with Image.open(path) as img:
      img.load()
      if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, np.float64)
        top = max(float(arr.max()), 1.0)
        arr = np.clip(arr * (255.0 / top), 0, 255).astype(np.uint8)
        return np.repeat(arr[..., None], 3, axis=2)
      if img.mode != "RGB":
        img = img.convert("RGBA").convert("RGB") if img.mode in (
            "P", "LA", "PA") else img.convert("RGB")
      return np.asarray(img, np.uint8).copy()
  except FileNotFoundError:
    raise
  except Exception as e:  # PIL raises many types for corrupt files.
    raise BadImageError(f"{path}: cannot decode image ({e})") from e


def has_segmentation(segm: Any) -> bool:
  """Whether an annotation's ``segmentation`` value describes a mask."""
  return segm is not None and not (isinstance(segm, list) and not segm)


def segmentation_problem(segm: Any, h: int, w: int) -> Optional[str]:
  """Why ``segm`` is not a valid COCO mask of an ``h x w`` image, or None.

  Valid: polygons (a list of lists of >= 6 finite numbers, x/y pairs), an
  uncompressed RLE (``counts`` a list of non-negative ints summing to
  ``h * w``) or a compressed RLE (``counts`` a str), both with ``size ==
  [h, w]``. A missing value or ``[]`` means "no mask" (not a problem).
  """
  if not has_segmentation(segm):
    return None
  if isinstance(segm, list):
    for poly in segm:
      if not isinstance(poly, list):
        return f"polygon is a {type(poly).__name__}, not a list of numbers"
      if len(poly) < 6 or len(poly) % 2:
        return (f"polygon with {len(poly)} numbers (needs >= 6 numbers, "
                "x/y pairs)")
      try:
        total = sum(poly)  # C speed; any non-number raises
      except TypeError:
        return "polygon with non-numeric coordinates"
      if not math.isfinite(total):
        return "polygon with non-finite coordinates"
    return None
  if isinstance(segm, dict):
    size, counts = segm.get("size"), segm.get("counts")
    if not (isinstance(size, (list, tuple)) and len(size) == 2):
      return f"RLE without a [height, width] 'size' (got {size!r})"
    if list(size) != [h, w]:
      return f"RLE size {list(size)} differs from the image's [{h}, {w}]"
    if isinstance(counts, list):
      if not all(isinstance(v, int) and v >= 0 for v in counts):
        return "RLE counts are not non-negative ints"
      if sum(counts) != h * w:
        return (f"RLE counts sum to {sum(counts)}, not height * width = "
                f"{h * w}")
      return None
    if isinstance(counts, str):
      if not counts or not all(48 <= ord(c) < 112 for c in counts):
        return "compressed RLE counts are not a valid COCO RLE string"
      return None
    return f"RLE counts is a {type(counts).__name__}"
  return f"a {type(segm).__name__} (expected polygons or an RLE dict)"


def segmentation_to_mask(segm: Any, h: int, w: int) -> np.ndarray:
  """COCO polygon / RLE / uncompressed RLE -> uint8 [h, w]."""
  if isinstance(segm, list):
    if not segm:
      return np.zeros((h, w), np.uint8)
    rles = mask_utils.frPyObjects(segm, h, w)
    rle = mask_utils.merge(rles)
  elif isinstance(segm, dict) and isinstance(segm.get("counts"), list):
    rle = mask_utils.frPyObjects(segm, h, w)
  else:
    rle = segm
  return mask_utils.decode(rle).astype(np.uint8)


class CocoSource:
  """Random-access COCO source (grain-compatible: __len__, __getitem__)."""

  def __init__(self, root: str, split: str, *, with_masks: bool = False,
               skip_empty: bool = False,
               annotation_file: Optional[str] = None,
               require_masks: bool = False):
    self.root = root
    self.split = split
    self.with_masks = with_masks
    self.name = f"coco:{root}:{split}"
    self.annotation_file = annotation_file or os.path.join(
        root, "annotations", f"instances_{split}.json")
    self.image_dir = os.path.join(root, split)
    if not os.path.exists(self.annotation_file):
      raise FileNotFoundError(
          f"{self.name}: annotation file {self.annotation_file} not found")
    try:
      with open(self.annotation_file) as f:
        data = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{self.annotation_file}: invalid JSON ({e})") from e
    for key in ("images", "annotations", "categories"):
      if key not in data:
        raise ValueError(f"{self.annotation_file}: missing field '{key}'")
    self._check_unique_ids(data)
    listed = {img.get("id") for img in data["images"]}

    cats = sorted(data["categories"], key=lambda c: c["id"])
    self.category_ids: Sequence[int] = tuple(int(c["id"]) for c in cats)
    self.class_names: Sequence[str] = tuple(c["name"] for c in cats)
    cat_to_label = {c: i for i, c in enumerate(self.category_ids)}

    anns_by_image: Dict[int, List[dict]] = {}
    unlisted: List[Any] = []
    for i, ann in enumerate(data["annotations"]):
      for key in ("image_id", "bbox", "category_id"):
        if key not in ann:
          raise ValueError(f"{self.annotation_file}: annotations[{i}] "
                           f"(id={ann.get('id')}) missing field '{key}'")
      if ann["category_id"] not in cat_to_label:
        raise ValueError(f"{self.annotation_file}: annotations[{i}] "
                         f"(id={ann.get('id')}) has unknown category_id "
                         f"{ann['category_id']}")
      if ann["image_id"] not in listed:
        unlisted.append(ann["image_id"])
        continue
      anns_by_image.setdefault(int(ann["image_id"]), []).append(ann)

    self.records: List[Dict[str, Any]] = []
    self.missing_files: List[str] = []
    self.stats = {"images": 0, "instances": 0, "crowd": 0, "bad_boxes": 0,
                  "missing_files": 0, "empty_images": 0,
                  "unlisted_annotations": len(unlisted),
                  "no_segmentation": 0}
    for img in sorted(data["images"], key=lambda r: r["id"]):
      for key in ("id", "file_name", "height", "width"):
        if key not in img:
          raise ValueError(f"{self.annotation_file}: image {img.get('id')} "
                           f"missing field '{key}'")
      path = os.path.join(self.image_dir, img["file_name"])
      if not os.path.exists(path):
        self.missing_files.append(path)
        continue
      rec = self._parse(img, anns_by_image.get(int(img["id"]), []),
                        cat_to_label)
      if not rec["labels"].size:
        self.stats["empty_images"] += 1
        if skip_empty:
          continue
      self.records.append(rec)
    self.stats["images"] = len(self.records)
    self.stats["instances"] = int(sum(r["labels"].size for r in self.records))
    self.stats["crowd"] = int(sum(r["num_crowd"] for r in self.records))
    self.stats["bad_boxes"] = int(sum(r["num_bad_boxes"]
                                      for r in self.records))
    self.stats["missing_files"] = len(self.missing_files)
    self.stats["no_segmentation"] = int(sum(r["num_no_segmentation"]
                                            for r in self.records))
    # The first few images with dropped boxes, for the load report.
    self.bad_box_files = [r["file_name"] for r in self.records
                          if r["num_bad_boxes"]][:5]
    if self.missing_files:
      logging.warning("%s: %d image files missing, skipped (first: %s)",
                      self.name, len(self.missing_files),
                      self.missing_files[0])
    if unlisted:
      logging.warning(
          "%s: %d annotations point at image ids not in 'images' and are "
          "ignored (first ids: %s)", self.annotation_file, len(unlisted),
          unlisted[:5])
    if not self.stats["instances"]:
      raise ValueError(
          f"{self.annotation_file}: no usable instance ("
          f"{len(data['annotations'])} annotations: {self.stats['crowd']} "
          f"crowd, {self.stats['bad_boxes']} bad boxes, {len(unlisted)} on "
          f"image ids not in 'images'; {len(self.missing_files)} of "
          f"{len(data['images'])} image files missing). Nothing to train "
          "or evaluate on: check the file and the split.")
    if require_masks and self.stats["no_segmentation"]:
      first = next(r["first_no_segmentation"] for r in self.records
                   if r["num_no_segmentation"])
      raise ValueError(
          f"{self.annotation_file}: masks are required (mask supervision: "
          f"data.with_masks / method='mask'; tools.mask_ceiling), but "
          f"{self.stats['no_segmentation']} of {self.stats['instances']} "
          f"instances have no segmentation (first: annotation id={first}). "
          "Use a box-supervised method, or an annotation file with masks.")

  def _check_unique_ids(self, data: Dict[str, Any]) -> None:
    """ValueError naming the file and id when an id occurs twice."""
    for field in ("images", "annotations"):
      items = [x for x in data[field] if isinstance(x, dict)]
      ids = collections.Counter(x["id"] for x in items
                                if x.get("id") is not None)
      dups = [i for i, n in ids.items() if n > 1]
      if not dups:
        continue
      detail = ""
      if field == "images":
        names = [str(x.get("file_name")) for x in items
                 if x.get("id") == dups[0]]
        detail = f" ({', '.join(names)})"
      raise ValueError(
          f"{self.annotation_file}: {len(dups)} duplicate id(s) in "
          f"'{field}': id={dups[0]} occurs {ids[dups[0]]} times{detail}. "
          "Every id must be unique (fix the tool that wrote the file).")

  def _parse(self, img: dict, anns: List[dict],
             cat_to_label: Dict[int, int]) -> Dict[str, Any]:
    h, w = int(img["height"]), int(img["width"])
    boxes, labels, segms = [], [], []
    num_crowd = num_bad = num_no_segm = 0
    first_no_segm = None
    for ann in anns:
      problem = segmentation_problem(ann.get("segmentation"), h, w)
      if problem:
        raise ValueError(
            f"{self.annotation_file}: annotation id={ann.get('id')} (image "
            f"{img['id']}, {img['file_name']}): malformed 'segmentation': "
            f"{problem}")
      if ann.get("iscrowd", 0):
        num_crowd += 1
        continue
      try:
        x, y, bw, bh = (float(v) for v in ann["bbox"])
      except (TypeError, ValueError):
        num_bad += 1
        continue
      box = np.array([x, y, x + bw, y + bh], np.float64)
      if not np.all(np.isfinite(box)) or bw <= 0 or bh <= 0:
        num_bad += 1
        continue
      box = np.clip(box, 0, [w, h, w, h])
      if box[2] - box[0] <= 1e-5 or box[3] - box[1] <= 1e-5:
        num_bad += 1
        continue
      boxes.append(box)
      labels.append(cat_to_label[ann["category_id"]])
      segm = ann.get("segmentation")
      segms.append(segm if has_segmentation(segm) else None)
      if not has_segmentation(segm):
        num_no_segm += 1
        if first_no_segm is None:
          first_no_segm = ann.get("id")
    return {
        "image_id": int(img["id"]),
        "file_name": img["file_name"],
        "height": h, "width": w,
        "boxes": np.asarray(boxes, np.float32).reshape(-1, 4),
        "labels": np.asarray(labels, np.int32),
        "segmentations": segms,
        "num_crowd": num_crowd,
        "num_bad_boxes": num_bad,
        "num_no_segmentation": num_no_segm,
        "first_no_segmentation": first_no_segm,
    }

  def __len__(self) -> int:
    return len(self.records)

  def image_size(self, index: int) -> Tuple[int, int]:
    """(height, width) of record ``index`` from the JSON, not decoded."""
    rec = self.records[index]
    return rec["height"], rec["width"]

  def __getitem__(self, index: int) -> features.Example:
    rec = self.records[index]
    path = os.path.join(self.image_dir, rec["file_name"])
    image = load_image(path)
    h, w = image.shape[:2]
    if (h, w) != (rec["height"], rec["width"]):
      raise BadImageError(
          f"{path}: decoded size {h}x{w} differs from the annotation's "
          f"height/width {rec['height']}x{rec['width']}")
    ex = {
        "image": image,
        "boxes": rec["boxes"].copy(),
        "labels": rec["labels"].copy(),
        "image_id": rec["image_id"],
        "file_name": path,
        "num_crowd": rec["num_crowd"],
        "num_bad_boxes": rec["num_bad_boxes"],
    }
    if self.with_masks:
      ms = [segmentation_to_mask(s, h, w) if s is not None else
            np.zeros((h, w), np.uint8) for s in rec["segmentations"]]
      ex["masks"] = (np.stack(ms) if ms else np.zeros((0, h, w), np.uint8))
    return ex

  def __repr__(self) -> str:
    return self.name
