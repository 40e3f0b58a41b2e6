"""Binary masks on a stride grid and their full-resolution meaning.

A mask-head grid cell `(a, b)` of stride `s` stands for the `s x s` pixel
block `[s a, s a + s) x [s b, s b + s)` (its sample point is the block's
centre `(s a + s/2, s b + s/2)`). Methods that paste objects (BoxSeg's
peer-assisted copy-paste, CutLER's copy-paste) keep their masks on that grid
and read the full-resolution mask as the grid upsampled by blocks, so the
composite image, the object's box and the grid mask describe one mask.
Pure jnp, static shapes.
"""

import jax.numpy as jnp


def first_last(any_: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
  """First index and one past the last True of `[..., L]` (0, 0 if none)."""
  size = any_.shape[-1]
  first = jnp.argmax(any_, axis=-1)
  last = size - jnp.argmax(any_[..., ::-1], axis=-1)
  has = any_.any(-1)
  return jnp.where(has, first, 0), jnp.where(has, last, 0)


def block_boxes(crop_masks: jnp.ndarray, origin: jnp.ndarray,
                image_hw: tuple[jnp.ndarray, jnp.ndarray], stride: int
                ) -> jnp.ndarray:
  """Tight boxes of the shifted full-resolution masks, `[K, 4]`.

  Crop cell `(i, j)` covers target pixels `[oy + s i, oy + s i + s)` x
  `[ox + s j, ...)`, clipped to the image `[0, h) x [0, w)`; the box is the
  code's `(x_min, y_min, x_max + 1, y_max + 1)` of their union (0 if
  empty).
  """
  k, hcg, wcg = crop_masks.shape
  h, w = image_hw
  s = stride
  ys = origin[0] + s * jnp.arange(hcg)
  xs = origin[1] + s * jnp.arange(wcg)
  ok = (crop_masks & ((ys < h) & (ys + s > 0))[None, :, None] &
        ((xs < w) & (xs + s > 0))[None, None, :])
  rows, cols = ok.any(-1), ok.any(-2)
  r0, r1 = first_last(rows)
  c0, c1 = first_last(cols)
  y0 = jnp.maximum(ys[jnp.minimum(r0, hcg - 1)], 0)
  y1 = jnp.minimum(ys[jnp.maximum(r1 - 1, 0)] + s, h)
  x0 = jnp.maximum(xs[jnp.minimum(c0, wcg - 1)], 0)
  x1 = jnp.minimum(xs[jnp.maximum(c1 - 1, 0)] + s, w)
  has = rows.any(-1)
  return jnp.where(has[:, None], jnp.stack([x0, y0, x1, y1], -1),
                   0).astype(jnp.float32)


def block_upsample(crop_mask: jnp.ndarray, origin: jnp.ndarray,
                   image_valid: jnp.ndarray, stride: int
                   ) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
  """The crop-grid mask `[hc, wc]` at full resolution on the target.

  Returns:
    `(U [H, W] bool, rows [H], cols [W])`: the block-upsampled mask inside
    the target image, and the crop pixel row / column each target pixel
    reads (clipped; meaningful where `U`).
  """
  hcg, wcg = crop_mask.shape
  height, width = image_valid.shape
  s = stride
  fy = jnp.arange(height) - origin[0]
  fx = jnp.arange(width) - origin[1]
  ok_y = (fy >= 0) & (fy < hcg * s)
  ok_x = (fx >= 0) & (fx < wcg * s)
  rows = jnp.clip(fy, 0, hcg * s - 1)
  cols = jnp.clip(fx, 0, wcg * s - 1)
  u = crop_mask[rows // s][:, cols // s] & ok_y[:, None] & ok_x[None, :]
  return u & image_valid, rows, cols
