"""CondInst inference post-processing, host half (reference §2.6, §8).

The device half, `ops.detections.detect` (re-exported here as `detect`),
returns fixed-size detections with stride-4 mask probabilities;
`to_coco_predictions` (numpy) rescales boxes to the original image, clips
and drops empty ones, upsamples masks (`aligned_bilinear` x4, crop to the
resized image, bilinear `align_corners=False` to the original size,
`> 0.5`) and RLE-encodes them with pycocotools, optionally with BoxTeacher's
mask-aware rescoring and the two box-fill baselines.
"""

import functools
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np
import scipy.sparse
from pycocotools import mask as mask_utils

from boxseg_jax.evaluation import coco_eval
from boxseg_jax.ops.aligned_bilinear import aligned_bilinear
from boxseg_jax.ops.detections import detect  # pylint: disable=unused-import
from boxseg_jax.ops.detections import fcos_candidates  # pylint: disable=unused-import


# ----------------------------------------------------------------- host side


@functools.lru_cache(maxsize=64)
def _aligned_bilinear_matrix(size: int, factor: int) -> np.ndarray:
  """`[factor * size, size]` linear map of `aligned_bilinear` along one axis."""
  eye = jnp.eye(size, dtype=jnp.float32)[:, :, None, None]  # [k, size, 1, 1]
  out = np.asarray(aligned_bilinear(eye, factor))[:, :, 0, 0]  # [k, f*size]
  return out.T


def resize_matrix(in_size: int, out_size: int) -> np.ndarray:
  """`[out, in]` map of torch bilinear interpolation, `align_corners=False`.

  Source coordinate `(o + 0.5) * in / out - 0.5`, clamped at 0; the upper
  tap is clamped to the last element (torch `upsample_bilinear2d`).
  """
  scale = in_size / out_size
  src = np.maximum((np.arange(out_size) + 0.5) * scale - 0.5, 0.0)
  i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  i1 = np.minimum(i0 + 1, in_size - 1)
  lam = np.clip(src - i0, 0.0, 1.0)
  m = np.zeros((out_size, in_size), np.float64)
  rows = np.arange(out_size)
  np.add.at(m, (rows, i0), 1.0 - lam)
  np.add.at(m, (rows, i1), lam)
  return m


def _paste_matrix(grid_size: int, factor: int, resized: int,
                  original: int) -> scipy.sparse.csr_matrix:
  """Sparse `[original, grid_size]`: upsample x factor, crop, resize."""
  up = _aligned_bilinear_matrix(grid_size, factor)[:resized]
  return scipy.sparse.csr_matrix(
      (resize_matrix(resized, original) @ up).astype(np.float32))


def paste_masks(mask_probs: np.ndarray, *, resized_size: tuple[int, int],
                orig_size: tuple[int, int], mask_stride: int = 4) -> np.ndarray:
  """Mask probabilities at the original image size (host, numpy).

  `aligned_bilinear` x `mask_stride` to the padded canvas, crop to the
  resized image `[:h_r, :w_r]`, bilinear (`align_corners=False`) to
  `orig_size` — applied as one sparse linear map per axis.

  Args:
    mask_probs: `[D, h, w]` probabilities on the stride grid.
    resized_size: `(h_r, w_r)` of the resized image inside the canvas.
    orig_size: `(H_o, W_o)` of the original image.
    mask_stride: stride of `mask_probs` (1: already at canvas resolution).

  Returns:
    `[D, H_o, W_o]` float32.
  """
  num, h, w = mask_probs.shape
  (h_r, w_r), (h_o, w_o) = resized_size, orig_size
  my = _paste_matrix(h, mask_stride, int(h_r), int(h_o))  # [H_o, h]
  mx = _paste_matrix(w, mask_stride, int(w_r), int(w_o))  # [W_o, w]
  p = np.asarray(mask_probs, np.float32)
  y = my @ p.transpose(1, 0, 2).reshape(h, num * w)  # [H_o, D*w]
  y = y.reshape(h_o * num, w)
  z = (mx @ y.T).T  # [H_o*D, W_o]
  return np.ascontiguousarray(
      z.reshape(h_o, num, w_o).transpose(1, 0, 2)).astype(np.float32)


def grid_box_masks(boxes: np.ndarray, grid_shape: tuple[int, int],
                   stride: int = 4) -> np.ndarray:
  """Boxes filled on the stride grid, `[D, 4] -> [D, h, w]` float32 (host).

  The numpy twin of `losses.boxinst.box_masks_at_stride`: cell `(i, j)` is
  on when its sample pixel `(s i + s/2, s j + s/2)` lies in the truncated
  box (inclusive), the box masks the BoxInst losses train against.
  """
  h, w = grid_shape
  start = stride // 2
  ys = np.arange(h, dtype=np.float32) * stride + start
  xs = np.arange(w, dtype=np.float32) * stride + start
  b = np.trunc(np.asarray(boxes, np.float32))
  rows = (ys >= b[:, 1:2]) & (ys <= b[:, 3:4])
  cols = (xs >= b[:, 0:1]) & (xs <= b[:, 2:3])
  return (rows[:, :, None] & cols[:, None, :]).astype(np.float32)


def mask_aware_scores(scores: np.ndarray, probs: np.ndarray,
                      threshold: float = 0.5) -> np.ndarray:
  """BoxTeacher's rescored detection score `sqrt(c · m̄)` (reference §4.3).

  Args:
    scores: `[D]` FCOS scores `c = sqrt(σ(cls) σ(ctr))`.
    probs: `[D, ...]` mask probabilities (any resolution).
    threshold: `M = 1[P > threshold]`.

  Returns:
    `[D]` with `m̄ = Σ(P·M) / (ΣM + 1e-6)` (0 for an empty mask).
  """
  p = np.asarray(probs, np.float32).reshape(len(scores), -1)
  m = p > threshold
  mean_fg = (p * m).sum(-1) / (m.sum(-1) + 1e-6)
  return np.sqrt(np.asarray(scores, np.float32) * mean_fg)


def _box_rles(boxes_xywh: np.ndarray, h: int, w: int) -> list[dict]:
  rles = mask_utils.frPyObjects(
      np.asarray(boxes_xywh, np.float64).reshape(-1, 4), h, w)
  for r in rles:
    r['counts'] = r['counts'].decode('ascii')
  return rles


def to_coco_predictions(detections: dict,
                        *,
                        image_id: int,
                        resized_size: tuple[int, int],
                        orig_size: tuple[int, int],
                        label_to_category_id: Sequence[int],
                        mask_threshold: float = 0.5,
                        mask_stride: int = 4,
                        rescore: bool = False,
                        boxfill: bool = False) -> list[dict]:
  """COCO result dicts of one image from `detect` output (host numpy).

  Args:
    detections: one image's `detect` output as numpy (`boxes`, `scores`,
      `labels`, `valid`, optional `mask_probs`).
    image_id: COCO image id.
    resized_size: `(h_r, w_r)` of the resized image on the canvas.
    orig_size: `(H_o, W_o)` original image size.
    label_to_category_id: contiguous label -> COCO category id.
    mask_threshold: binarisation threshold (`> 0.5`).
    mask_stride: stride of `mask_probs`.
    rescore: replace each score by BoxTeacher's mask-aware `sqrt(c · m̄)`
      with `m̄` from the pasted mask at the original size (reference §4.8).
    boxfill: also emit the two box-fill baselines (same detections, same
      scores, each box filled as its mask): `segmentation_boxfill` filled
      at the original resolution, and `segmentation_boxfill_grid` filled on
      the stride grid and pasted back exactly like predicted masks.

  Returns:
    list of `{'image_id', 'category_id', 'bbox' [x, y, w, h], 'score',
    'segmentation' (RLE, counts as str; only with masks)}` (+ the box-fill
    keys), in detection order.
  """
  valid = np.asarray(detections['valid'], bool)
  canvas_boxes = np.asarray(detections['boxes'], np.float32)[valid]
  boxes = canvas_boxes.copy()
  scores = np.asarray(detections['scores'], np.float32)[valid]
  labels = np.asarray(detections['labels'], np.int64)[valid]
  (h_r, w_r), (h_o, w_o) = resized_size, orig_size
  boxes[:, 0::2] *= w_o / w_r
  boxes[:, 1::2] *= h_o / h_r
  boxes[:, 0::2] = np.clip(boxes[:, 0::2], 0, w_o)
  boxes[:, 1::2] = np.clip(boxes[:, 1::2], 0, h_o)
  nonempty = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
  boxes, scores, labels = boxes[nonempty], scores[nonempty], labels[nonempty]
  canvas_boxes = canvas_boxes[nonempty]
  extra: dict[str, list] = {}
  if 'mask_probs' in detections and len(boxes):
    probs = np.asarray(detections['mask_probs'])[valid][nonempty]
    pasted = paste_masks(probs, resized_size=(h_r, w_r),
                         orig_size=(h_o, w_o), mask_stride=mask_stride)
    if rescore:
      scores = mask_aware_scores(scores, pasted, mask_threshold)
    extra['segmentation'] = [coco_eval.encode_mask(m)
                             for m in pasted > mask_threshold]
    if boxfill:
      xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], 1)
      extra['segmentation_boxfill'] = _box_rles(xywh, int(h_o), int(w_o))
      grid = grid_box_masks(canvas_boxes, probs.shape[-2:], mask_stride)
      grid_pasted = paste_masks(grid, resized_size=(h_r, w_r),
                                orig_size=(h_o, w_o), mask_stride=mask_stride)
      extra['segmentation_boxfill_grid'] = [
          coco_eval.encode_mask(m) for m in grid_pasted > mask_threshold]
  results = []
  for i in range(len(boxes)):
    x0, y0, x1, y1 = (float(v) for v in boxes[i])
    res = {
        'image_id': int(image_id),
        'category_id': int(label_to_category_id[int(labels[i])]),
        'bbox': [x0, y0, x1 - x0, y1 - y0],
        'score': float(scores[i]),
    }
    for key, values in extra.items():
      res[key] = values[i]
    results.append(res)
  return results
