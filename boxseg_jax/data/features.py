"""The contracts between data sources, transforms and the device step.

Nothing here imports jax: the host pipeline is numpy/PIL/grain only.

**Example** (what a source returns for one image, before transforms):

  image         uint8 [h, w, 3] RGB at the original resolution.
  boxes         float32 [n, 4] absolute x0, y0, x1, y1 in original pixels.
  labels        int32 [n] contiguous class index in [0, num_classes).
  masks         uint8 [n, h, w] visible-part masks (optional; evaluation,
                visualisation and mask-supervised configs only).
  image_id      int, the COCO image id.
  file_name     str, for error messages.
  num_crowd     int, crowd regions dropped by the source (never instances).
  num_bad_boxes int, annotations dropped by the source (NaN, degenerate).

**Batch** (what the pipeline yields; static shapes; ``N = max_instances``;
one canvas ``H x W`` per batch: ``data.canvas``, or with ``data.canvases``
the landscape or the portrait canvas of the batch's orientation group):

  image           uint8 [B, H, W, 3] student view (photometric augmentation).
  image_teacher   uint8 [B, H, W, 3] same geometry, no photometric change.
  image_valid     bool [B, H, W] True on real (unpadded) pixels.
  boxes           float32 [B, N, 4] absolute x0, y0, x1, y1 on the canvas.
  labels          int32 [B, N], padding -1.
  instance_valid  bool [B, N].
  example_valid   bool [B].
  masks           bool [B, N, H/4, W/4] (only when ``with_masks``): GT masks
                  point-sampled at ``[2::4, 2::4]`` of the canvas, the grid
                  the CondInst mask head predicts on.
  monitor_masks   the same, for ``train.monitor_pseudo_labels`` only: no
                  loss reads this key.
  teacher_view    uint8 [B, Ht, Wt, 3] (``teacher.view = "test_scale"``):
                  the student's geometry (same flip) at the test scale on
                  the teacher canvas, no photometric change.
  teacher_view_valid  bool [B, Ht, Wt].
  scale           float32 [B, 2] (sy, sx): resized / original size; BoxInst
                  removes the bottom ``int(10 * sy)`` rows from its pairwise
                  validity (reference §3.2).
  Host-only fields (never sent to devices): image_id int64 [B],
  orig_size int32 [B, 2] (h, w), resized_size int32 [B, 2] (h, w of the
  resized image inside the canvas), num_truncated int32 [B], num_dropped
  int32 [B] (degenerate boxes dropped by the transforms plus those dropped by
  the source).

Images travel as uint8 (4x less host-to-device traffic than float32); the
step normalises them on device.
"""

from typing import Any, Dict

import numpy as np

Example = Dict[str, Any]
Batch = Dict[str, np.ndarray]

DEVICE_KEYS = ("image", "image_teacher", "image_valid", "boxes", "labels",
               "instance_valid", "example_valid", "scale")
# Sent to devices when present: GT masks (mask supervision), GT masks for the
# pseudo-label monitor only, and the teacher's test-scale view.
OPTIONAL_DEVICE_KEYS = ("masks", "monitor_masks", "teacher_view",
                        "teacher_view_valid")
MASK_KEY = "masks"
HOST_KEYS = ("image_id", "orig_size", "resized_size", "num_truncated",
             "num_dropped")

# Subsampling of GT masks onto the stride-4 mask-head grid (CondInst
# MASK_OUT_STRIDE = 4, sampled at offset MASK_OUT_STRIDE // 2).
MASK_STRIDE = 4
MASK_OFFSET = MASK_STRIDE // 2


def device_batch(batch: Batch) -> Batch:
  """Returns the fields of ``batch`` that go to the accelerator."""
  keys = DEVICE_KEYS + tuple(k for k in OPTIONAL_DEVICE_KEYS if k in batch)
  return {k: batch[k] for k in keys}


def host_batch(batch: Batch) -> Batch:
  """Returns the host-only fields of ``batch``."""
  return {k: batch[k] for k in HOST_KEYS if k in batch}


def check_example(ex: Example) -> None:
  """Raises ValueError naming the field when an example breaks the contract."""
  name = ex.get("file_name", ex.get("image_id", "?"))
  img = ex["image"]
  if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
    raise ValueError(f"{name}: field 'image' must be uint8 [h, w, 3], got "
                     f"{img.dtype} {img.shape}")
  n = len(ex["labels"])
  if ex["boxes"].shape != (n, 4):
    raise ValueError(f"{name}: field 'boxes' must be [{n}, 4], got "
                     f"{ex['boxes'].shape}")
  if "masks" in ex and ex["masks"].shape != (n,) + img.shape[:2]:
    raise ValueError(f"{name}: field 'masks' must be [{n}, h, w], got "
                     f"{ex['masks'].shape}")
