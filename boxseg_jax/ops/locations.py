"""FCOS location grids for the padded input canvas (static, numpy).

A feature map of stride `s` has one location per cell at pixel
`(x_idx * s + s // 2, y_idx * s + s // 2)` (AdelaiDet `compute_locations`),
flattened row-major (y slowest). All functions here depend only on static
shapes, so they return numpy arrays that can be closed over by jitted code.
"""

from typing import NamedTuple, Sequence

import numpy as np

FPN_STRIDES = (8, 16, 32, 64, 128)
# The backbone's deepest input feature (res5) has stride 32: the padded canvas
# is a multiple of it, and coarser levels halve with ceil (3x3/2 convs, pad 1).
SIZE_DIVISIBILITY = 32


class FcosLocations(NamedTuple):
  """All FCOS locations, levels concatenated in stride order.

  Attributes:
    points: `[L, 2]` float32 `(x, y)` pixel coordinates on the padded canvas.
    levels: `[L]` int32 level index (0 for the first stride, usually P3).
    strides: `[L]` float32 stride of each location's level.
  """
  points: np.ndarray
  levels: np.ndarray
  strides: np.ndarray


def compute_locations(h: int, w: int, stride: int) -> np.ndarray:
  """Pixel centres of an `h x w` feature map with the given stride.

  Args:
    h: feature map height.
    w: feature map width.
    stride: feature stride in pixels.

  Returns:
    `[h * w, 2]` float32 `(x, y)` = `(x_idx * s + s // 2, y_idx * s + s // 2)`,
    row-major (y slowest).
  """
  xs = np.arange(w, dtype=np.float32) * stride + stride // 2
  ys = np.arange(h, dtype=np.float32) * stride + stride // 2
  yy, xx = np.meshgrid(ys, xs, indexing="ij")
  return np.stack([xx.reshape(-1), yy.reshape(-1)], axis=1).astype(np.float32)


def _level_size(n: int, stride: int) -> int:
  if stride <= SIZE_DIVISIBILITY:
    if SIZE_DIVISIBILITY % stride:
      raise ValueError(f"stride {stride} does not divide {SIZE_DIVISIBILITY}")
    return n // stride
  size, s = n // SIZE_DIVISIBILITY, SIZE_DIVISIBILITY
  while s < stride:
    size, s = -(-size // 2), s * 2
  if s != stride:
    raise ValueError(f"stride {stride} is not 32 * 2**k")
  return size


def fpn_level_shapes(
    height: int, width: int,
    strides: Sequence[int] = FPN_STRIDES) -> list[tuple[int, int]]:
  """Spatial size `(h_l, w_l)` of each FPN level for a padded input.

  Levels up to stride 32 are `H / s`; beyond, each level is `ceil` of half the
  previous one (P6 = ceil(P5 / 2), P7 = ceil(P6 / 2)).

  Args:
    height: padded input height `H`, a multiple of 32.
    width: padded input width `W`, a multiple of 32.
    strides: level strides, powers of two.

  Returns:
    A list of `(h_l, w_l)`, one per stride.
  """
  if height % SIZE_DIVISIBILITY or width % SIZE_DIVISIBILITY:
    raise ValueError(
        f"input size {height}x{width} must be a multiple of "
        f"{SIZE_DIVISIBILITY} (pad bottom/right first)")
  return [(_level_size(height, s), _level_size(width, s)) for s in strides]


def fcos_locations(height: int, width: int,
                   strides: Sequence[int] = FPN_STRIDES) -> FcosLocations:
  """All FCOS locations for a padded `H x W` input, levels concatenated.

  The order matches the flattened network outputs of `CondInst`: level by
  level in `strides` order, row-major within a level.

  Args:
    height: padded input height `H`, a multiple of 32.
    width: padded input width `W`, a multiple of 32.
    strides: level strides.

  Returns:
    `FcosLocations(points [L, 2] f32, levels [L] i32, strides [L] f32)`.
  """
  points, levels, per_loc_strides = [], [], []
  shapes = fpn_level_shapes(height, width, strides)
  for level, (stride, (h, w)) in enumerate(zip(strides, shapes)):
    points.append(compute_locations(h, w, stride))
    levels.append(np.full((h * w,), level, np.int32))
    per_loc_strides.append(np.full((h * w,), stride, np.float32))
  return FcosLocations(
      points=np.concatenate(points, axis=0),
      levels=np.concatenate(levels, axis=0),
      strides=np.concatenate(per_loc_strides, axis=0))
