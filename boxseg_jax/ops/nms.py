"""Static-size, class-aware greedy NMS in pure jnp.

Semantics of detectron2 `batched_nms` (torchvision `nms` per class): boxes
are visited in descending score order; a box is kept unless a previously kept
box **of the same class** overlaps it with IoU `> iou_threshold`. Boxes of
different classes never suppress each other. The output is the kept boxes in
descending score order, truncated to a fixed `max_output` slots.

Stopping after `max_output` boxes are kept is exact: greedy NMS decides a box
only from higher-scored boxes, so the first `max_output` kept boxes are the
same as in the untruncated run. detectron2/AdelaiDet's `kthvalue` cut can keep
more than `max_output` boxes when scores tie at the cut; we never do.
"""

import jax
import jax.numpy as jnp

from boxseg_jax.ops import boxes as box_ops


def batched_nms(boxes: jnp.ndarray,
                scores: jnp.ndarray,
                labels: jnp.ndarray,
                valid: jnp.ndarray,
                *,
                iou_threshold: float,
                max_output: int) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Class-aware NMS over a fixed number of candidates.

  Args:
    boxes: `[M, 4]` xyxy candidates.
    scores: `[M]` scores (higher first; ties keep the lower index first).
    labels: `[M]` int class of each candidate.
    valid: `[M]` bool; invalid candidates are never kept and never suppress.
    iou_threshold: a box is suppressed when IoU `>` this with a kept box of
      the same class.
    max_output: static number of output slots.

  Returns:
    `(indices [max_output] int32, keep_valid [max_output] bool)`: indices into
    the candidates of the kept boxes in descending score order; slots past the
    number of kept boxes hold index 0 and `keep_valid=False`.
  """
  num = boxes.shape[0]
  boxes = boxes.astype(jnp.float32)
  order_key = jnp.where(valid, scores.astype(jnp.float32), -jnp.inf)
  order = jnp.argsort(-order_key, stable=True)
  sorted_boxes = boxes[order]
  sorted_labels = labels[order]
  num_valid = jnp.sum(valid.astype(jnp.int32))

  def cond(carry):
    i, num_kept, _, _ = carry
    return (i < num_valid) & (num_kept < max_output)

  def body(carry):
    i, num_kept, suppressed, kept = carry
    is_kept = ~suppressed[i]
    kept = jnp.where(is_kept, kept.at[num_kept].set(i), kept)
    ious = box_ops.iou_to_many(sorted_boxes[i], sorted_boxes)
    hits = (ious > iou_threshold) & (sorted_labels == sorted_labels[i])
    suppressed = jnp.where(is_kept, suppressed | hits, suppressed)
    return i + 1, num_kept + is_kept.astype(jnp.int32), suppressed, kept

  init = (jnp.int32(0), jnp.int32(0), jnp.zeros((num,), bool),
          jnp.zeros((max_output,), jnp.int32))
  _, num_kept, _, kept = jax.lax.while_loop(cond, body, init)
  keep_valid = jnp.arange(max_output) < num_kept
  indices = jnp.where(keep_valid, order[kept], 0).astype(jnp.int32)
  return indices, keep_valid


def batched_nms_mask(boxes: jnp.ndarray, scores: jnp.ndarray,
                     labels: jnp.ndarray, valid: jnp.ndarray, *,
                     iou_threshold: float, max_output: int) -> jnp.ndarray:
  """Same as `batched_nms`, returned as a keep mask `[M]` bool."""
  indices, keep_valid = batched_nms(
      boxes, scores, labels, valid, iou_threshold=iou_threshold,
      max_output=max_output)
  return jnp.zeros(boxes.shape[:1], bool).at[indices].max(keep_valid)
