"""FCOS target assignment (reference §1.4), per image, pure jnp.

`fcos_targets` assigns every location of all FPN levels (concatenated, the
order of `ops.locations.fcos_locations`) to at most one ground-truth box of
its image. Call it per image and `jax.vmap` it over the batch
(`batch_fcos_targets` does that).

Decisions (docs/losses.md):
* Center sampling uses the box center (BoxTeacher), not the rasterized-box
  centroid of upstream BoxInst.
* The reference returns "no positives" for the whole image when its first GT
  has center-x 0 (a guard for empty GT tensors). We do not reproduce it:
  padded instances are masked with `instance_valid` instead.
* A location is positive when at least one valid GT passes both tests (the
  reference marks it with an area sentinel of 1e8, equivalent for any box
  smaller than 1e8 px^2).
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from boxseg_jax.ops import boxes as box_ops

_INF = 100000000.0


def size_ranges(sizes_of_interest: Sequence[float]) -> jnp.ndarray:
  """`[num_levels, 2]` inclusive (lo, hi): [-1, s0], [s0, s1], ... [s3, 1e8]."""
  bounds = [-1.0] + [float(s) for s in sizes_of_interest] + [_INF]
  return jnp.asarray([[bounds[i], bounds[i + 1]]
                      for i in range(len(bounds) - 1)], jnp.float32)


def ctrness_target(reg_targets: jnp.ndarray) -> jnp.ndarray:
  """Centerness `sqrt(min(l,r)/max(l,r) · min(t,b)/max(t,b))`, `[..., 4]` ltrb.

  Any positive unit works (the ratio is scale free). Where a max is 0 the
  value is defined as 0 (never the case for FCOS positives).
  """
  lr = reg_targets[..., jnp.array([0, 2])]
  tb = reg_targets[..., jnp.array([1, 3])]
  lr_max = lr.max(-1)
  tb_max = tb.max(-1)
  ok = (lr_max > 0) & (tb_max > 0)
  ratio = (lr.min(-1) / jnp.where(ok, lr_max, 1.0)) * (
      tb.min(-1) / jnp.where(ok, tb_max, 1.0))
  return jnp.where(ok, jnp.sqrt(jnp.maximum(ratio, 0.0)), 0.0)


def fcos_targets(points: jnp.ndarray,
                 level: jnp.ndarray,
                 strides: jnp.ndarray,
                 boxes: jnp.ndarray,
                 labels: jnp.ndarray,
                 instance_valid: jnp.ndarray,
                 *,
                 num_classes: int,
                 sizes_of_interest: Sequence[float] = (64, 128, 256, 512),
                 center_sampling_radius: float | None = 1.5) -> dict:
  """FCOS targets of one image (reference §1.4).

  Args:
    points: `[L, 2]` location (x, y) pixels, all levels concatenated.
    level: `[L]` int FPN level index (0 = stride 8) of each location.
    strides: `[L]` stride (pixels) of each location.
    boxes: `[N, 4]` xyxy GT boxes on the padded canvas.
    labels: `[N]` int class in `[0, num_classes)`.
    instance_valid: `[N]` bool; invalid rows are never assigned.
    num_classes: C; background label is C.
    sizes_of_interest: level size thresholds (4 numbers for 5 levels).
    center_sampling_radius: radius in strides of the center sub-box; `None`
      or 0 disables center sampling (plain inside-box test).

  Returns:
    dict with `labels [L]` int32 (C for background), `reg_targets [L, 4]`
    (l, t, r, b) / stride (0 for background), `gt_index [L]` int32 (-1 for
    background), `ctrness [L]` centerness target (0 for background) and
    `positive [L]` bool.
  """
  points = points.astype(jnp.float32)
  strides = strides.astype(jnp.float32)
  boxes = boxes.astype(jnp.float32)
  xs = points[:, 0][:, None]
  ys = points[:, 1][:, None]
  x0, y0, x1, y1 = (boxes[None, :, i] for i in range(4))
  # [L, N, 4] distances in pixels to the full GT box.
  ltrb = jnp.stack([xs - x0, ys - y0, x1 - xs, y1 - ys], axis=-1)

  if center_sampling_radius:
    cx = (x0 + x1) * 0.5
    cy = (y0 + y1) * 0.5
    radius = strides[:, None] * center_sampling_radius
    sub_x0 = jnp.where(cx - radius > x0, cx - radius, x0)
    sub_y0 = jnp.where(cy - radius > y0, cy - radius, y0)
    sub_x1 = jnp.where(cx + radius > x1, x1, cx + radius)
    sub_y1 = jnp.where(cy + radius > y1, y1, cy + radius)
    inside = jnp.minimum(
        jnp.minimum(xs - sub_x0, ys - sub_y0),
        jnp.minimum(sub_x1 - xs, sub_y1 - ys)) > 0
  else:
    inside = ltrb.min(-1) > 0

  ranges = size_ranges(sizes_of_interest)[level]  # [L, 2]
  max_reg = ltrb.max(-1)
  cared = (max_reg >= ranges[:, 0:1]) & (max_reg <= ranges[:, 1:2])

  candidate = inside & cared & instance_valid[None, :]
  area = box_ops.box_area(boxes)
  area_or_inf = jnp.where(candidate, area[None, :], jnp.inf)
  gt = jnp.argmin(area_or_inf, axis=1).astype(jnp.int32)  # first index on ties
  positive = candidate.any(axis=1)

  reg = jnp.take_along_axis(ltrb, gt[:, None, None], axis=1)[:, 0]
  reg = jnp.where(positive[:, None], reg / strides[:, None], 0.0)
  return {
      'labels': jnp.where(positive, labels[gt], num_classes).astype(jnp.int32),
      'reg_targets': reg,
      'gt_index': jnp.where(positive, gt, -1).astype(jnp.int32),
      'ctrness': jnp.where(positive, ctrness_target(reg), 0.0),
      'positive': positive,
  }


def batch_fcos_targets(points: jnp.ndarray, level: jnp.ndarray,
                       strides: jnp.ndarray, boxes: jnp.ndarray,
                       labels: jnp.ndarray, instance_valid: jnp.ndarray,
                       **kwargs) -> dict:
  """`fcos_targets` vmapped over images: `boxes [B, N, 4]`... -> `[B, L, ...]`.

  `points`, `level`, `strides` are shared by all images (one canvas).
  """
  fn = lambda b, l, v: fcos_targets(points, level, strides, b, l, v, **kwargs)
  return jax.vmap(fn)(boxes, labels, instance_valid)
