"""Box geometry in pure jnp: areas, IoU, GIoU and ltrb <-> xyxy.

Boxes are absolute `x0, y0, x1, y1` pixels unless a name says `ltrb`: then
they are distances (left, top, right, bottom) from a location, in the unit the
caller states (pixels or FPN-stride units).
"""

import jax.numpy as jnp


def box_area(boxes: jnp.ndarray) -> jnp.ndarray:
  """Area `(x1 - x0) * (y1 - y0)` of boxes `[..., 4]` (no clamping, no +1)."""
  return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def pairwise_iou(boxes1: jnp.ndarray, boxes2: jnp.ndarray) -> jnp.ndarray:
  """IoU matrix between `[N, 4]` and `[M, 4]` xyxy boxes -> `[N, M]`.

  detectron2 `pairwise_iou` semantics: `inter / (a1 + a2 - inter)` where the
  intersection is positive, 0 elsewhere (so degenerate boxes give 0, not NaN).
  """
  lt = jnp.maximum(boxes1[:, None, :2], boxes2[None, :, :2])
  rb = jnp.minimum(boxes1[:, None, 2:], boxes2[None, :, 2:])
  wh = jnp.maximum(rb - lt, 0.0)
  inter = wh[..., 0] * wh[..., 1]
  union = box_area(boxes1)[:, None] + box_area(boxes2)[None, :] - inter
  positive = inter > 0
  return jnp.where(positive, inter / jnp.where(positive, union, 1.0), 0.0)


def iou_to_many(box: jnp.ndarray, boxes: jnp.ndarray) -> jnp.ndarray:
  """IoU of one xyxy box `[4]` with boxes `[M, 4]` -> `[M]` (torchvision nms).

  `inter / (a + a_m - inter)`; 0 where the union is not positive.
  """
  lt = jnp.maximum(box[:2], boxes[:, :2])
  rb = jnp.minimum(box[2:], boxes[:, 2:])
  wh = jnp.maximum(rb - lt, 0.0)
  inter = wh[:, 0] * wh[:, 1]
  union = box_area(box) + box_area(boxes) - inter
  positive = union > 0
  return jnp.where(positive, inter / jnp.where(positive, union, 1.0), 0.0)


def ltrb_to_xyxy(points: jnp.ndarray, ltrb: jnp.ndarray,
                 scale: jnp.ndarray | float = 1.0) -> jnp.ndarray:
  """Decodes distances to boxes: `(x - l*s, y - t*s, x + r*s, y + b*s)`.

  Args:
    points: `[..., 2]` location (x, y) in pixels.
    ltrb: `[..., 4]` distances, in units of `scale` pixels.
    scale: scalar or `[...]` (e.g. the FPN stride of each location).

  Returns:
    `[..., 4]` xyxy boxes in pixels (not clipped).
  """
  d = ltrb * jnp.asarray(scale, ltrb.dtype)[..., None]
  x, y = points[..., 0], points[..., 1]
  return jnp.stack([x - d[..., 0], y - d[..., 1], x + d[..., 2], y + d[..., 3]],
                   axis=-1)


def xyxy_to_ltrb(points: jnp.ndarray, boxes: jnp.ndarray,
                 scale: jnp.ndarray | float = 1.0) -> jnp.ndarray:
  """Distances `(x - x0, y - y0, x1 - x, y1 - y) / scale` (broadcasting).

  Args:
    points: `[..., 2]` (x, y) pixels.
    boxes: `[..., 4]` xyxy pixels, broadcastable against `points`.
    scale: scalar or broadcastable `[...]` divisor (e.g. the stride).

  Returns:
    `[..., 4]` (l, t, r, b); negative where the point is outside the box.
  """
  x, y = points[..., 0], points[..., 1]
  ltrb = jnp.stack([x - boxes[..., 0], y - boxes[..., 1],
                    boxes[..., 2] - x, boxes[..., 3] - y], axis=-1)
  return ltrb / jnp.asarray(scale, ltrb.dtype)[..., None]


def iou_giou_ltrb(pred: jnp.ndarray,
                  target: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
  """IoU and GIoU of two boxes sharing a location, given as (l, t, r, b).

  AdelaiDet `compute_ious` (reference §1.5): with `A_p = (l+r)(t+b)` and the
  same for the target, `I = (min l + min r)(min t + min b)`,
  `U = A_t + A_p - I`, `IoU = (I + 1) / (U + 1)`,
  `C = (max l + max r)(max t + max b)`, `GIoU = IoU - (C - U) / C`.
  The +1 smoothing is in the units of the inputs (FPN-stride units in FCOS);
  `C` has no epsilon, so callers must keep `C > 0` (true whenever the target
  has positive extent).

  Args:
    pred: `[..., 4]` non-negative distances.
    target: `[..., 4]` non-negative distances, same units.

  Returns:
    `(iou, giou)`, each `[...]`.
  """
  pl, pt, pr, pb = (pred[..., i] for i in range(4))
  tl, tt, tr, tb = (target[..., i] for i in range(4))
  target_area = (tl + tr) * (tt + tb)
  pred_area = (pl + pr) * (pt + pb)
  w_intersect = jnp.minimum(pl, tl) + jnp.minimum(pr, tr)
  h_intersect = jnp.minimum(pb, tb) + jnp.minimum(pt, tt)
  g_w_intersect = jnp.maximum(pl, tl) + jnp.maximum(pr, tr)
  g_h_intersect = jnp.maximum(pb, tb) + jnp.maximum(pt, tt)
  ac_union = g_w_intersect * g_h_intersect
  area_intersect = w_intersect * h_intersect
  area_union = target_area + pred_area - area_intersect
  ious = (area_intersect + 1.0) / (area_union + 1.0)
  gious = ious - (ac_union - area_union) / ac_union
  return ious, gious
