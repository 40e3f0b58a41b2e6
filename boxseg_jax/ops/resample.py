"""Mask probabilities from one view's stride grid onto another's, on device.

BoxTeacher's teacher sees the image at the test scale on its own canvas and
pastes its masks back to the student's resolution (reference §4.2): the
stride-4 probabilities are upsampled with `aligned_bilinear`, cropped to the
teacher's resized image, resized bilinearly (`align_corners=False`) to the
student's resized image, zero-padded to the student canvas and point-sampled
at `[s/2::s, s/2::s]` (§4.5 step 1). Per axis this chain is linear, so it is
one `[out_grid, in_grid]` matrix whose taps depend on the two resized sizes:
traced values, so images of any scale share one compilation.
"""

import functools

import jax.numpy as jnp
import numpy as np

from boxseg_jax.ops import aligned_bilinear as ab


@functools.lru_cache(maxsize=32)
def _upsample_matrix(grid: int, factor: int) -> np.ndarray:
  """`[factor * grid, grid]` linear map of `aligned_bilinear` on one axis."""
  lo, hi, frac = ab._axis_taps(grid, factor)  # pylint: disable=protected-access
  m = np.zeros((grid * factor, grid), np.float32)
  rows = np.arange(grid * factor)
  np.add.at(m, (rows, lo), 1.0 - frac)
  np.add.at(m, (rows, hi), frac)
  return m


def grid_resample_matrix(out_grid: int, in_grid: int, out_size: jnp.ndarray,
                         in_size: jnp.ndarray, stride: int = 4
                         ) -> jnp.ndarray:
  """One axis of the teacher-grid -> student-grid map, `[out_grid, in_grid]`.

  Output row `i` is the student pixel `y = s i + s/2`. For `y < out_size`
  its source coordinate in the teacher's resized image is
  `(y + 0.5) in_size / out_size - 0.5` (clamped at 0, upper tap clamped to
  `in_size - 1`, torch's bilinear rule); the teacher row there is read from
  the `aligned_bilinear` upsampling of the grid. Rows past `out_size` are
  zero (padding).

  Args:
    out_grid: static student grid length (`canvas / stride`).
    in_grid: static teacher grid length.
    out_size: traced student resized length (pixels, <= out_grid * stride).
    in_size: traced teacher resized length (pixels, <= in_grid * stride).
    stride: grid stride of both views.

  Returns:
    `[out_grid, in_grid]` float32.
  """
  up = jnp.asarray(_upsample_matrix(in_grid, stride))
  out_size = jnp.asarray(out_size, jnp.float32)
  in_size = jnp.asarray(in_size, jnp.float32)
  y = jnp.arange(out_grid, dtype=jnp.float32) * stride + stride // 2
  src = jnp.maximum((y + 0.5) * in_size / jnp.maximum(out_size, 1.0) - 0.5,
                    0.0)
  last = jnp.maximum(in_size - 1.0, 0.0)
  i0 = jnp.minimum(jnp.floor(src), last)
  i1 = jnp.minimum(i0 + 1.0, last)
  lam = jnp.clip(src - i0, 0.0, 1.0)
  rows = ((1.0 - lam)[:, None] * up[i0.astype(jnp.int32)] +
          lam[:, None] * up[i1.astype(jnp.int32)])
  return rows * (y < out_size).astype(jnp.float32)[:, None]


def resample_masks(probs: jnp.ndarray, rows: jnp.ndarray,
                   cols: jnp.ndarray) -> jnp.ndarray:
  """`[D, hi, wi]` -> `[D, ho, wo]` through per-axis matrices.

  Args:
    probs: mask probabilities on the source grid.
    rows: `[ho, hi]` from `grid_resample_matrix`.
    cols: `[wo, wi]` from `grid_resample_matrix`.
  """
  tmp = jnp.einsum('ya,dab->dyb', rows, probs.astype(jnp.float32))
  return jnp.einsum('dyb,xb->dyx', tmp, cols)


def valid_extent(valid: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
  """`(rows, cols)` of the image in a top-left-anchored `[H, W]` validity."""
  return (jnp.sum(valid.any(axis=1).astype(jnp.int32)),
          jnp.sum(valid.any(axis=0).astype(jnp.int32)))
