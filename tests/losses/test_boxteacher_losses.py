"""BoxTeacher student losses (reference §4.5-4.6) from their formulas."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from boxseg_jax.losses import boxinst
from boxseg_jax.losses import boxteacher

OFFSETS = [(-2, -2), (-2, 0), (-2, 2), (0, -2), (0, 2), (2, -2), (2, 0), (2, 2)]


def test_smooth_masks_hand_case():
  m = np.zeros((5, 5), np.float32)
  m[2, 2] = 1.0
  got = np.asarray(boxteacher.smooth_masks(jnp.asarray(m)))
  # Centre: (1/9 + 1) / 2; its 8 neighbours: (1/9 + 0) / 2; others 0.
  assert got[2, 2] == pytest.approx(5 / 9)
  assert got[1, 1] == pytest.approx(1 / 18) and got[3, 2] == pytest.approx(
      1 / 18)
  assert got[0, 0] == 0.0
  # Zero padding counts in the denominator: a full mask's corner is
  # (4/9 + 1) / 2.
  full = np.asarray(boxteacher.smooth_masks(jnp.ones((4, 4))))
  assert full[0, 0] == pytest.approx((4 / 9 + 1) / 2)
  assert full[1, 1] == pytest.approx(1.0)


def _affinity_np(masks, validity):
  """Reference §4.5 step 4 with explicit loops."""
  n, h, w = masks.shape
  soft = np.zeros_like(masks, np.float64)
  for k in range(n):
    for y in range(h):
      for x in range(w):
        acc = 0.0
        for dy in (-1, 0, 1):
          for dx in (-1, 0, 1):
            yy, xx = y + dy, x + dx
            if 0 <= yy < h and 0 <= xx < w:
              acc += masks[k, yy, xx]
        soft[k, y, x] = (acc / 9 + masks[k, y, x]) / 2
  out = np.zeros((n, 8, h, w))
  for k in range(n):
    for e, (dy, dx) in enumerate(OFFSETS):
      for y in range(h):
        for x in range(w):
          yy, xx = y + dy, x + dx
          inside = 0 <= yy < h and 0 <= xx < w
          mj = soft[k, yy, xx] if inside else 0.0
          vj = validity[yy, xx] if inside else 0.0
          mi = soft[k, y, x]
          out[k, e, y, x] = (mi * mj + (1 - mi) * (1 - mj)) * vj
  return out


def test_mask_affinity_matches_loop():
  rng = np.random.default_rng(0)
  masks = (rng.uniform(size=(2, 7, 9)) < 0.4).astype(np.float32)
  validity = np.ones((7, 9), np.float32)
  validity[5:] = 0
  got = boxteacher.mask_affinity(jnp.asarray(masks), jnp.asarray(validity))
  np.testing.assert_allclose(got, _affinity_np(masks, validity), rtol=1e-5,
                             atol=1e-6)


def test_pixel_loss_two_instances_by_hand():
  p = np.zeros((2, 2, 2), np.float32)
  p[0] = [[1.0, 0.5], [0.0, 0.0]]
  p[1] = [[0.0, 0.0], [1.0, 1.0]]
  m = np.zeros((2, 2, 2), np.float32)
  m[:, 0, :] = 1.0
  # dice_0 = 1 - 2 * 1.5 / (1.25 + 2 + 1e-5); dice_1 = 1 - 0 = 1.
  d0 = 1 - 3 / (3.25 + 1e-5)
  valid = jnp.array([True, True])
  got = boxteacher.noise_aware_pixel_loss(
      jnp.asarray(p), jnp.asarray(m), jnp.array([0.8, 0.0]), valid)
  assert float(got) == pytest.approx(0.8 * d0, rel=1e-5)  # N_v = 1
  got = boxteacher.noise_aware_pixel_loss(
      jnp.asarray(p), jnp.asarray(m), jnp.array([0.8, 0.5]), valid)
  assert float(got) == pytest.approx((0.8 * d0 + 0.5 * 1.0) / 2, rel=1e-5)
  # An invalid slot counts neither in the sum nor in N_v.
  got = boxteacher.noise_aware_pixel_loss(
      jnp.asarray(p), jnp.asarray(m), jnp.array([0.8, 0.5]),
      jnp.array([True, False]))
  assert float(got) == pytest.approx(0.8 * d0, rel=1e-5)
  # No pseudo mask anywhere: N_v = max(0, 1), loss 0.
  assert float(boxteacher.noise_aware_pixel_loss(
      jnp.asarray(p), jnp.asarray(m), jnp.zeros(2), valid)) == 0.0


def _pairwise_map_np(logits):
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


@pytest.mark.parametrize("thresh", [0.5, -1.0])
def test_affinity_loss_two_instances_matches_formula(thresh):
  rng = np.random.default_rng(1)
  h, w = 6, 8
  logits = rng.normal(0, 2, (1, 2, h, w)).astype(np.float32)
  pseudo = np.zeros((1, 2, h, w), np.float32)
  pseudo[0, 0, 1:4, 2:6] = 1
  pseudo[0, 1, 3:6, 0:3] = 1
  box = np.zeros((1, 2, h, w), np.float32)
  box[0, 0, 0:5, 1:7] = 1
  box[0, 1, 2:6, 0:4] = 1
  validity = np.ones((1, h, w), np.float32)
  validity[0, :, 7] = 0
  flags = np.array([[0.9, 0.4]], np.float32)
  got = boxteacher.noise_reduced_affinity_loss(
      jnp.asarray(logits), jnp.asarray(pseudo), jnp.asarray(validity),
      jnp.asarray(box), jnp.asarray(flags), jnp.ones((1, 2), bool),
      thresh=thresh)
  aff = _affinity_np(pseudo[0], validity[0])
  wts = (aff if thresh < 0 else (aff >= thresh)) * box[0][:, None]
  lmap = _pairwise_map_np(logits[0])
  a = (lmap * wts).sum((1, 2, 3)) / np.maximum(wts.sum((1, 2, 3)), 1.0)
  expected = (flags[0] * a).sum() / 2
  assert float(got) == pytest.approx(expected, rel=1e-5)
  # The gradient reaches the logits and nothing else.
  g = jax.grad(lambda z: boxteacher.noise_reduced_affinity_loss(
      z, jnp.asarray(pseudo), jnp.asarray(validity), jnp.asarray(box),
      jnp.asarray(flags), jnp.ones((1, 2), bool), thresh=thresh))(
          jnp.asarray(logits))
  assert np.isfinite(np.asarray(g)).all() and float(jnp.abs(g).sum()) > 0


def test_affinity_sums_gradient_matches_autodiff():
  rng = np.random.default_rng(2)
  logits = rng.normal(0, 2, (2, 6, 7)).astype(np.float32)
  soft = boxteacher.smooth_masks(
      jnp.asarray((rng.uniform(size=(2, 6, 7)) < 0.5).astype(np.float32)))
  validity = jnp.ones((6, 7))
  box = jnp.asarray((rng.uniform(size=(2, 6, 7)) < 0.8).astype(np.float32))
  fn = lambda z: boxinst.affinity_pairwise_sums(z, soft, validity, box)[0]
  got = jax.jacrev(lambda z: fn(z).sum())(jnp.asarray(logits))
  edges = jnp.stack([
      boxinst.soft_mask_edge_weight(soft, validity, dy, dx, 0.5)
      for dy, dx in OFFSETS], axis=-3)
  auto = jax.grad(lambda z: boxinst._weighted_pairwise_sums_impl(  # pylint: disable=protected-access
      z, edges, None, box, tuple(OFFSETS), None).sum())(jnp.asarray(logits))
  np.testing.assert_allclose(got, auto, rtol=1e-4, atol=1e-6)


def test_mask_warmup_values():
  # BoxTeacher increments its counter before use: w = (t + 1) / 10000.
  f = lambda t: float(boxinst.pairwise_warmup_factor(t, 10000))
  assert f(0) == pytest.approx(1e-4)
  assert f(4999) == pytest.approx(0.5)
  assert f(9999) == 1.0 and f(50000) == 1.0
  assert math.isclose(float(boxinst.pairwise_warmup_factor(49, 100)), 0.5)
