"""Tests for ops.aligned_bilinear against the reference *procedure*."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from boxseg_jax.ops.aligned_bilinear import aligned_bilinear


def _resize_align_corners(x, out_h, out_w):
  """Bilinear resize with align_corners=True, loops, float64. x: [h, w, C]."""
  in_h, in_w = x.shape[:2]
  out = np.zeros((out_h, out_w, x.shape[2]), np.float64)
  for i in range(out_h):
    sy = i * (in_h - 1) / (out_h - 1) if out_h > 1 else 0.0
    y0 = int(np.floor(sy))
    y1 = min(y0 + 1, in_h - 1)
    wy = sy - y0
    for j in range(out_w):
      sx = j * (in_w - 1) / (out_w - 1) if out_w > 1 else 0.0
      x0 = int(np.floor(sx))
      x1 = min(x0 + 1, in_w - 1)
      wx = sx - x0
      out[i, j] = ((1 - wy) * (1 - wx) * x[y0, x0] + (1 - wy) * wx * x[y0, x1]
                   + wy * (1 - wx) * x[y1, x0] + wy * wx * x[y1, x1])
  return out


def _reference_procedure(x, f):
  """AdelaiDet's steps: pad, align_corners resize, pad f//2, crop. [h,w,C]."""
  if f == 1:
    return x
  h, w = x.shape[:2]
  x = np.pad(x, ((0, 1), (0, 1), (0, 0)), mode="edge")
  x = _resize_align_corners(x, f * h + 1, f * w + 1)
  p = f // 2
  x = np.pad(x, ((p, 0), (p, 0), (0, 0)), mode="edge")
  return x[:f * h, :f * w]


@pytest.mark.parametrize("factor", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("hw", [(1, 1), (3, 5), (4, 2), (6, 7)])
def test_matches_reference_procedure(factor, hw):
  rng = np.random.default_rng(factor * 100 + hw[0] * 10 + hw[1])
  x = rng.normal(size=(2, hw[0], hw[1], 3)).astype(np.float32)
  got = np.asarray(aligned_bilinear(jnp.asarray(x), factor))
  assert got.shape == (2, factor * hw[0], factor * hw[1], 3)
  for b in range(2):
    want = _reference_procedure(x[b].astype(np.float64), factor)
    np.testing.assert_allclose(got[b], want, rtol=1e-5, atol=1e-5)


def test_hand_computed_1d_factor2():
  # src [0, 4]: padded [0, 4, 4] sampled at o/2 -> [0, 2, 4, 4, 4]; pad one
  # on the left -> [0, 0, 2, 4, 4, 4]; first 4.
  x = jnp.asarray([0.0, 4.0]).reshape(1, 1, 2, 1)
  got = aligned_bilinear(x, 2)
  np.testing.assert_allclose(np.asarray(got)[0, :, :, 0],
                             [[0, 0, 2, 4], [0, 0, 2, 4]])


def test_hand_computed_1d_factor4():
  # out[o] = src[0] for o < 2; then src sampled at (o - 2) / 4 = 0, .25, .5,
  # .75, 1, 1.25 (replicated past the end).
  x = jnp.asarray([0.0, 8.0]).reshape(1, 2, 1, 1)  # along y this time
  got = np.asarray(aligned_bilinear(x, 4))[0, :, :, 0]
  np.testing.assert_allclose(got[:, 0], [0, 0, 0, 2, 4, 6, 8, 8])
  np.testing.assert_allclose(got[:, 3], got[:, 0])


def test_hand_computed_2d_factor2():
  # Separable. Along x each row [a, b] -> [a, a, (a + b) / 2, b]:
  # [[0, 0, 1, 2], [4, 4, 5, 6]]; then along y each column [c, d] ->
  # [c, c, (c + d) / 2, d].
  x = jnp.asarray([[0.0, 2.0], [4.0, 6.0]]).reshape(1, 2, 2, 1)
  got = np.asarray(aligned_bilinear(x, 2))[0, :, :, 0]
  want = [[0, 0, 1, 2], [0, 0, 1, 2], [2, 2, 3, 4], [4, 4, 5, 6]]
  np.testing.assert_allclose(got, want)


def test_identity_for_factor_one_and_leading_dims():
  x = jnp.arange(2 * 3 * 4 * 5 * 2, dtype=jnp.float32).reshape(2, 3, 4, 5, 2)
  assert aligned_bilinear(x, 1) is x
  got = aligned_bilinear(x, 2)
  assert got.shape == (2, 3, 8, 10, 2)
  np.testing.assert_allclose(got[1, 2], aligned_bilinear(x[1, 2][None], 2)[0])


def test_rejects_bad_factor():
  x = jnp.zeros((1, 2, 2, 1))
  with pytest.raises(ValueError):
    aligned_bilinear(x, 0)
  with pytest.raises(ValueError):
    aligned_bilinear(x, 1.5)


def test_jit_grad_and_dtype():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 3, 4, 2)),
                  jnp.float32)
  fn = jax.jit(lambda v: aligned_bilinear(v, 4))
  np.testing.assert_allclose(fn(x), aligned_bilinear(x, 4), rtol=1e-5,
                             atol=1e-6)
  # Each output is a convex combination of inputs, so d(sum out)/dx sums to
  # the number of outputs.
  g = jax.grad(lambda v: aligned_bilinear(v, 4).sum())(x)
  np.testing.assert_allclose(float(g.sum()), 16 * x.size, rtol=1e-5)
  assert aligned_bilinear(x.astype(jnp.bfloat16), 2).dtype == jnp.bfloat16
