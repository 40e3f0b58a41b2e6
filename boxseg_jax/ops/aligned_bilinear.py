"""AdelaiDet's `aligned_bilinear` upsampling as a gather + lerp.

The reference (AdelaiDet `adet/utils/comm.py`) upsamples an `h x w` map by an
integer factor `f` like this: replicate-pad one row/column at the bottom/right,
bilinearly resize with `align_corners=True` to `(f*h + 1) x (f*w + 1)` (output
index `o` then samples source coordinate `o / f` exactly), replicate-pad `f//2`
rows/columns at the top/left and crop the first `f*h x f*w`.

Per axis this is the closed form

  out[o] = lerp_src(max(o - f//2, 0) / f),

where `lerp_src(u)` interpolates linearly between `src[floor(u)]` and
`src[floor(u) + 1]`, the source being replicated past its last element. The
indices and weights only depend on the static sizes, so they are computed with
numpy and the traced work is two gathers and two lerps. `jax.image.resize` uses
half-pixel centres and does not reproduce this.
"""

import jax
import jax.numpy as jnp
import numpy as np


def _axis_taps(size: int, factor: int) -> tuple[np.ndarray, np.ndarray,
                                                 np.ndarray]:
  """Source indices and weight of the upper tap for one axis.

  Args:
    size: source length `h`.
    factor: integer upsampling factor `f >= 1`.

  Returns:
    `(lo, hi, frac)`, each `[f * h]`: `out[o] = (1 - frac[o]) * src[lo[o]] +
    frac[o] * src[hi[o]]`.
  """
  o = np.arange(size * factor, dtype=np.int64)
  shifted = np.maximum(o - factor // 2, 0)
  lo = shifted // factor
  frac = (shifted - lo * factor).astype(np.float64) / factor
  hi = np.minimum(lo + 1, size - 1)
  return lo, hi, frac.astype(np.float32)


def _upsample_axis(x: jax.Array, factor: int, axis: int) -> jax.Array:
  size = x.shape[axis]
  lo, hi, frac = _axis_taps(size, factor)
  x_lo = jnp.take(x, jnp.asarray(lo, jnp.int32), axis=axis)
  x_hi = jnp.take(x, jnp.asarray(hi, jnp.int32), axis=axis)
  weight_shape = [1] * x.ndim
  weight_shape[axis] = frac.shape[0]
  weight = jnp.asarray(frac.reshape(weight_shape), dtype=x.dtype)
  return x_lo + (x_hi - x_lo) * weight


def aligned_bilinear(x: jax.Array, factor: int) -> jax.Array:
  """Upsamples the two spatial axes of `x` by an integer factor.

  Args:
    x: `[..., h, w, C]` array (NHWC, or any leading batch dims); the spatial
      axes are the third- and second-to-last.
    factor: static integer `f >= 1`.

  Returns:
    `[..., f*h, f*w, C]` array of the same dtype; `x` itself when `f == 1`.
  """
  if not isinstance(factor, (int, np.integer)) or factor < 1:
    raise ValueError(f"factor must be an integer >= 1, got {factor!r}")
  if x.ndim < 3:
    raise ValueError(f"expected [..., h, w, C], got shape {x.shape}")
  if factor == 1:
    return x
  factor = int(factor)
  x = _upsample_axis(x, factor, x.ndim - 3)
  return _upsample_axis(x, factor, x.ndim - 2)
