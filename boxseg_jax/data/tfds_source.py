"""`tfds:NAME:SPLIT`: a TFDS dataset read through ``tfds.data_source``.

Expects TFDS's COCO layout: ``image``, ``image/id``, ``objects`` with
``bbox`` (normalised ymin, xmin, ymax, xmax), ``label`` and optionally
``is_crowd``; optional ``masks`` [n, h, w]. Crowd objects are dropped and
counted, degenerate boxes dropped and counted. Labels are TFDS's contiguous
class indices; category ids for COCO export are ``label + 1``.
"""

from typing import Optional, Tuple

import numpy as np
import tensorflow_datasets as tfds

from boxseg_jax.data import features
from boxseg_jax.data import tfds_shapes  # registers boxseg_shapes  # pylint: disable=unused-import


class TfdsSource:
  """Random-access TFDS source (grain-compatible)."""

  def __init__(self, name: str, split: str, *, data_dir=None,
               with_masks: bool = False, require_masks: bool = False):
    self.name = f"tfds:{name}:{split}"
    try:
      self._ds = tfds.data_source(name, split=split, data_dir=data_dir,
                                  download=False, try_gcs=False)
    except Exception as e:
      raise ValueError(f"{self.name}: cannot open with tfds.data_source "
                       f"(data_dir={data_dir!r}): {e}") from e
    feats = self._ds.dataset_info.features
    for key in ("image", "objects"):
      if key not in feats:
        raise ValueError(f"{self.name}: feature '{key}' missing; expected "
                         "TFDS's COCO layout")
    if require_masks and "masks" not in feats:
      raise ValueError(
          f"{self.name}: masks are required (mask supervision: "
          "data.with_masks / method='mask'; tools.mask_ceiling), but this "
          "dataset has no 'masks' feature. Use a box-supervised method, or "
          "a dataset with masks.")
    label = feats["objects"]["label"]
    self.class_names = tuple(label.names)
    self.category_ids = tuple(range(1, label.num_classes + 1))
    self.with_masks = with_masks
    shape = tuple(feats["image"].shape)[:2]
    self._static_size: Optional[Tuple[int, int]] = (
        (int(shape[0]), int(shape[1])) if None not in shape else None)

  def __len__(self) -> int:
    return len(self._ds)

  def image_size(self, index: int) -> Tuple[int, int]:
    """(height, width) of every image: the ``image`` feature's static shape.

    Raises:
      ValueError: the feature's shape is not static (images of varying
        size: their sizes are only known by decoding them).
    """
    if self._static_size is None:
      raise ValueError(
          f"{self.name}: the 'image' feature has no static shape, so image "
          "sizes are only known by decoding the images; orientation "
          "canvases (data.canvases) need them up front: use a single "
          "data.canvas, or convert the data to coco:ROOT:SPLIT (its JSON "
          "has every image's height and width)")
    if not 0 <= index < len(self):
      raise IndexError(f"{self.name}: index {index} out of range")
    return self._static_size

  def __getitem__(self, index: int) -> features.Example:
    rec = self._ds[int(index)]
    image = np.asarray(rec["image"])
    if image.ndim == 2 or image.shape[-1] == 1:
      image = np.repeat(image.reshape(image.shape[:2] + (1,)), 3, axis=2)
    image = image[..., :3].astype(np.uint8)
    h, w = image.shape[:2]
    obj = rec["objects"]
    bbox = np.asarray(obj["bbox"], np.float32).reshape(-1, 4)
    boxes = np.stack([bbox[:, 1] * w, bbox[:, 0] * h, bbox[:, 3] * w,
                      bbox[:, 2] * h], axis=1)
    labels = np.asarray(obj["label"], np.int32)
    crowd = np.asarray(obj.get("is_crowd", np.zeros(len(labels), bool)),
                       bool)
    finite = np.all(np.isfinite(boxes), axis=1)
    good = finite & (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    keep = good & ~crowd
    ex = {
        "image": image,
        "boxes": boxes[keep].astype(np.float32),
        "labels": labels[keep],
        "image_id": int(rec.get("image/id", index)),
        "file_name": f"{self.name}[{index}]",
        "num_crowd": int(crowd.sum()),
        "num_bad_boxes": int((~good & ~crowd).sum()),
    }
    if self.with_masks and "masks" in rec:
      ex["masks"] = np.asarray(rec["masks"], np.uint8)[keep]
    return ex

  def __repr__(self) -> str:
    return self.name
