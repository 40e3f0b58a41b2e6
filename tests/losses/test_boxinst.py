"""Tests for boxseg_jax.losses.boxinst: formulas and numpy loops (§3)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from boxseg_jax.losses import boxinst

OFFSETS = [(-2, -2), (-2, 0), (-2, 2), (0, -2), (0, 2), (2, -2), (2, 0), (2, 2)]


def test_neighbor_order():
  assert list(boxinst.neighbor_offsets(3, 2)) == OFFSETS
  assert len(boxinst.neighbor_offsets(5, 1)) == 24


def _box_masks_reference(boxes, full_h, full_w, stride):
  """Full-resolution rasterisation, then [s//2::s, s//2::s] (§3.1)."""
  out = []
  for x0, y0, x1, y1 in boxes:
    full = np.zeros((full_h, full_w), np.float32)
    full[int(y0):int(y1 + 1), int(x0):int(x1 + 1)] = 1.0
    out.append(full[stride // 2::stride, stride // 2::stride])
  return np.stack(out)


def test_box_masks_hand_case():
  # Sampled pixels 2, 6, 10, 14. Rows int(5.9)=5 .. int(6.0)=6 -> row 6 only;
  # cols int(2.7)=2 .. int(13.2)=13 -> cols 2, 6, 10.
  m = np.asarray(boxinst.box_masks_at_stride(
      jnp.array([[2.7, 5.9, 13.2, 6.0]]), (4, 4), 4))[0]
  expected = np.zeros((4, 4))
  expected[1, 0:3] = 1
  np.testing.assert_array_equal(m, expected)


def test_box_masks_match_full_resolution_sampling():
  rng = np.random.default_rng(0)
  xy = rng.uniform(0, 60, (30, 2))
  boxes = np.concatenate([xy, xy + rng.uniform(0, 40, (30, 2))], 1)
  boxes = np.minimum(boxes, 63.9).astype(np.float32)
  got = boxinst.box_masks_at_stride(jnp.asarray(boxes), (16, 16), 4)
  np.testing.assert_array_equal(got, _box_masks_reference(boxes, 64, 64, 4))


def test_image_validity_bottom_rows():
  valid = np.zeros((16, 16), bool)
  valid[:13, :10] = True  # resized image 13 x 10 in a 16 x 16 canvas
  # rows_removed 3 -> image rows 0..9 stay; sampled rows 2, 6 valid, 10 not;
  # sampled cols 2, 6 valid, 10 and 14 are padding.
  got = np.asarray(boxinst.image_validity_at_stride(jnp.asarray(valid), 3))
  expected = np.zeros((4, 4))
  expected[:2, :2] = 1
  np.testing.assert_array_equal(got, expected)
  got = np.asarray(boxinst.image_validity_at_stride(jnp.asarray(valid), 0))
  expected[2, :2] = 1  # row 10 < 13 is valid when nothing is removed
  np.testing.assert_array_equal(got, expected)
  assert boxinst.bottom_rows_removed(800, 480) == 16  # int(10 * 800 / 480)


def test_rgb2lab_known_values():
  rgb = jnp.array([[255., 255., 255.], [255., 0., 0.], [0., 0., 0.],
                   [0., 255., 0.], [0., 0., 255.]])
  lab = np.asarray(boxinst.rgb2lab(rgb))
  np.testing.assert_allclose(lab[0], [100.0, 0.0, 0.0], atol=0.01)
  np.testing.assert_allclose(lab[1], [53.24, 80.09, 67.20], atol=0.01)
  np.testing.assert_allclose(lab[2], [0.0, 0.0, 0.0], atol=1e-4)
  # skimage.color.rgb2lab values for pure green and blue.
  np.testing.assert_allclose(lab[3], [87.735, -86.183, 83.179], atol=0.01)
  np.testing.assert_allclose(lab[4], [32.297, 79.188, -107.860], atol=0.01)


def _lab_np(rgb):
  """RGB 0..255 -> LAB from the §3.3 formula, float64, one pixel at a time."""
  mat = [[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169],
         [0.019334, 0.119193, 0.950227]]
  white = [0.95047, 1.0, 1.08883]
  out = np.zeros(rgb.shape, np.float64)
  for idx in np.ndindex(rgb.shape[:-1]):
    c = [v / 255.0 for v in rgb[idx]]
    c = [((v + 0.055) / 1.055) ** 2.4 if v > 0.04045 else v / 12.92 for v in c]
    xyz = [sum(mat[r][k] * c[k] for k in range(3)) / white[r] for r in range(3)]
    f = [v ** (1 / 3) if v > 0.008856 else 7.787 * v + 16 / 116 for v in xyz]
    out[idx] = [116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2])]
  return out


def test_color_similarity_matches_numpy_loop():
  rng = np.random.default_rng(1)
  # Two flat colour regions plus noise: similarities span (0, 1).
  image = np.where(np.arange(32)[None, :, None] < 14, [200., 40., 90.],
                   [60., 180., 120.]) + rng.integers(-12, 13, (24, 32, 3))
  image = np.clip(image, 0, 255).astype(np.float32)
  image[:, 28:] = 0  # padding columns
  validity = (rng.uniform(size=(6, 8)) < 0.8).astype(np.float32)
  got = np.asarray(boxinst.color_similarity(jnp.asarray(image),
                                            jnp.asarray(validity)))
  pooled = np.floor(image.reshape(6, 4, 8, 4, 3).mean(axis=(1, 3)))
  lab = _lab_np(pooled)
  expected = np.zeros((8, 6, 8))
  for e, (dy, dx) in enumerate(OFFSETS):
    for y in range(6):
      for x in range(8):
        yy, xx = y + dy, x + dx
        inside = 0 <= yy < 6 and 0 <= xx < 8
        nb = lab[yy, xx] if inside else np.zeros(3)
        v = validity[yy, xx] if inside else 0.0
        expected[e, y, x] = math.exp(-np.linalg.norm(lab[y, x] - nb) * 0.5) * v
  np.testing.assert_allclose(got, expected, atol=2e-5)
  # Both sides of the threshold τ = 0.3 occur among valid neighbours.
  assert (expected > 0.3).sum() > 50
  assert ((expected > 0) & (expected < 0.3)).sum() > 10


def test_pool_truncates_before_lab():
  # A 4x4 cell averaging to 100.9375 must be floored to 100 before LAB.
  image = np.full((4, 8, 3), 100.0, np.float32)
  image[0, 0] = 115.0  # +15 / 16 = 0.9375
  sim = np.asarray(boxinst.color_similarity(
      jnp.asarray(image), jnp.ones((1, 2)), size=3, dilation=1))
  # Neighbour (0, +1) of cell (0, 0) is cell (0, 1) of value exactly 100.
  e = list(boxinst.neighbor_offsets(3, 1)).index((0, 1))
  assert sim[e, 0, 0] == pytest.approx(1.0)


def test_projection_loss_hand_case():
  scores = jnp.array([[[0.2, 0.9, 0.1], [0.4, 0.3, 0.0]]])
  box = jnp.array([[[0., 1., 1.], [0., 1., 1.]]])
  # max over y: [0.4, 0.9, 0.1] vs [0, 1, 1]: Σxt = 1.0, Σx² = 0.98, Σt² = 2.
  # max over x: [0.9, 0.4] vs [1, 1]: Σxt = 1.3, Σx² = 0.97, Σt² = 2.
  expected = (1 - 2.0 / (2.98 + 1e-5)) + (1 - 2.6 / (2.97 + 1e-5))
  np.testing.assert_allclose(boxinst.projection_loss(scores, box), [expected],
                             rtol=1e-6)


def _pairwise_map_np(logits):
  """-log(p_i p_j + (1-p_i)(1-p_j)) with a direct loop (neighbours outside:
  zero log-probabilities, i.e. p_j counts as 1 for fg and for bg)."""
  n, h, w = logits.shape
  lf = -np.logaddexp(0, -logits.astype(np.float64))
  lb = -np.logaddexp(0, logits.astype(np.float64))
  out = np.zeros((n, 8, h, w))
  for k in range(n):
    for e, (dy, dx) in enumerate(OFFSETS):
      for y in range(h):
        for x in range(w):
          yy, xx = y + dy, x + dx
          inside = 0 <= yy < h and 0 <= xx < w
          fj = lf[k, yy, xx] if inside else 0.0
          bj = lb[k, yy, xx] if inside else 0.0
          out[k, e, y, x] = -np.logaddexp(lf[k, y, x] + fj, lb[k, y, x] + bj)
  return out


def test_pairwise_map_matches_numpy_loop():
  rng = np.random.default_rng(2)
  logits = rng.normal(0, 4, (2, 5, 7)).astype(np.float32)
  logits[0, 0, 0] = 60.0  # saturated: the log-space form must stay finite
  got = np.asarray(boxinst.pairwise_loss_map(jnp.asarray(logits)))
  np.testing.assert_allclose(got, _pairwise_map_np(logits), rtol=1e-5,
                             atol=1e-6)
  # Direct probability form on an interior pixel: p=σ(z).
  p = 1 / (1 + np.exp(-logits.astype(np.float64)))
  v = -np.log(p[1, 2, 3] * p[1, 0, 1] + (1 - p[1, 2, 3]) * (1 - p[1, 0, 1]))
  assert got[1, 0, 2, 3] == pytest.approx(v, rel=1e-5)


def test_pairwise_loss_weights_and_normaliser():
  rng = np.random.default_rng(3)
  logits = rng.normal(0, 2, (3, 6, 8)).astype(np.float32)
  sim = rng.uniform(0, 1, (3, 8, 6, 8)).astype(np.float32)
  box = (rng.uniform(size=(3, 6, 8)) < 0.6).astype(np.float32)
  valid = np.array([True, True, False])
  loss, wsum = boxinst.pairwise_loss(jnp.asarray(logits), jnp.asarray(sim),
                                     jnp.asarray(box), jnp.asarray(valid))
  wts = (sim >= 0.3) * box[:, None] * valid[:, None, None, None]
  lmap = _pairwise_map_np(logits)
  expected = (lmap * wts).sum() / max(wts.sum(), 1.0)
  assert float(wsum) == wts.sum()
  np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
  # No weight at all -> 0 / max(0, 1) = 0.
  loss0, _ = boxinst.pairwise_loss(jnp.asarray(logits), jnp.asarray(sim),
                                   jnp.zeros((3, 6, 8)))
  assert float(loss0) == 0.0
  g = jax.grad(lambda z: boxinst.pairwise_loss(
      z, jnp.asarray(sim), jnp.asarray(box))[0])(jnp.asarray(logits) * 20)
  assert np.isfinite(np.asarray(g)).all()


def test_warmup_step_convention():
  f = boxinst.pairwise_warmup_factor
  assert float(f(0)) == pytest.approx(1e-4)  # counter incremented first
  assert float(f(4999)) == pytest.approx(0.5)
  assert float(f(9999)) == 1.0
  assert float(f(123456)) == 1.0


def test_pairwise_custom_gradient_matches_autodiff():
  rng = np.random.default_rng(4)
  logits = rng.normal(0, 3, (2, 3, 6, 7)).astype(np.float32)
  logits[0, 0, 1, 1] = 40.0   # saturated pixels next to opposite logits
  logits[0, 0, 1, 3] = -40.0
  sim = rng.uniform(0, 1, (2, 1, 8, 6, 7)).astype(np.float32)
  box = (rng.uniform(size=(2, 3, 6, 7)) < 0.7).astype(np.float32)
  valid = np.array([[True, True, False], [True, False, True]])
  fn = lambda z: boxinst.pairwise_loss(z, jnp.asarray(sim), jnp.asarray(box),
                                       jnp.asarray(valid))[0]
  got = np.asarray(jax.grad(fn)(jnp.asarray(logits)))
  # Independent path: autodiff through the same forward formula.
  edge = (sim >= 0.3).astype(np.float32)
  center = box * valid[..., None, None]
  wsum = (edge * center[:, :, None]).sum()
  auto = jax.grad(lambda z: boxinst._weighted_pairwise_sums_impl(
      z, jnp.asarray(edge), None, jnp.asarray(center),
      boxinst.neighbor_offsets(3, 2), None).sum() / max(wsum, 1.0))(
          jnp.asarray(logits))
  np.testing.assert_allclose(got, np.asarray(auto), rtol=1e-4, atol=1e-7)
  assert np.isfinite(got).all() and np.abs(got).sum() > 0
  # Finite difference on one interior logit (float64 numpy loop).
  wts = edge * center[:, :, None]
  def total(z):
    return (_pairwise_map_np(z.reshape(-1, 6, 7)).reshape(2, 3, 8, 6, 7) *
            wts).sum() / max(wts.sum(), 1.0)
  z = logits.astype(np.float64)
  eps = 1e-4
  zp, zm = z.copy(), z.copy()
  zp[1, 2, 3, 3] += eps
  zm[1, 2, 3, 3] -= eps
  fd = (total(zp) - total(zm)) / (2 * eps)
  assert got[1, 2, 3, 3] == pytest.approx(fd, rel=1e-3, abs=1e-7)


def test_weighted_pairwise_sums_per_instance():
  rng = np.random.default_rng(5)
  logits = rng.normal(0, 2, (3, 5, 6)).astype(np.float32)
  aff = rng.uniform(size=(3, 8, 5, 6)).astype(np.float32)  # per instance
  box = (rng.uniform(size=(3, 5, 6)) < 0.7).astype(np.float32)
  got = boxinst.weighted_pairwise_sums(jnp.asarray(logits),
                                       jnp.asarray(aff >= 0.5),
                                       jnp.asarray(box))
  lmap = _pairwise_map_np(logits)
  expected = (lmap * (aff >= 0.5) * box[:, None]).sum(axis=(1, 2, 3))
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  # Per-instance cotangents reach the right instance only.
  g = jax.grad(lambda z: boxinst.weighted_pairwise_sums(
      z, jnp.asarray(aff >= 0.5), jnp.asarray(box))[1])(jnp.asarray(logits))
  assert float(jnp.abs(g[0]).sum()) == 0 and float(jnp.abs(g[2]).sum()) == 0
  assert float(jnp.abs(g[1]).sum()) > 0
