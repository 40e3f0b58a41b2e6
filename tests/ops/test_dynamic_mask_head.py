"""Tests for boxseg_jax.ops.dynamic_mask_head against a loop from §2.3."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from boxseg_jax.ops import dynamic_mask_head as dmh
from boxseg_jax.ops.aligned_bilinear import aligned_bilinear


def _loop_head(feats, params, locs, soi, stride=8):
  """Per instance, per pixel: input (rel_x, rel_y, feats) -> 3 layers.

  Layout written from §2.3: W0[o, i] = p[o * 18 + i] (8 x 18), then
  W1 (8 x 8) at 144, W2 (1 x 8) at 208, b0 at 216, b1 at 224, b2 at 232.
  """
  h, w, cin = feats.shape
  assert cin == 16 and params.shape[1] == 233
  out = np.zeros((len(params), h, w))
  for k, p in enumerate(params.astype(np.float64)):
    w0 = np.array([[p[o * 18 + i] for i in range(18)] for o in range(8)])
    w1 = np.array([[p[144 + o * 8 + i] for i in range(8)] for o in range(8)])
    w2 = np.array([[p[208 + i] for i in range(8)]])
    b0, b1, b2 = p[216:224], p[224:232], p[232:233]
    for y in range(h):
      for x in range(w):
        px, py = x * stride + stride // 2, y * stride + stride // 2
        rel = [(locs[k, 0] - px) / soi[k], (locs[k, 1] - py) / soi[k]]
        v = np.concatenate([rel, feats[y, x].astype(np.float64)])
        v = np.maximum(w0 @ v + b0, 0)
        v = np.maximum(w1 @ v + b1, 0)
        out[k, y, x] = (w2 @ v + b2)[0]
  return out


def _case(seed=0, n=3, h=4, w=5):
  rng = np.random.default_rng(seed)
  feats = rng.normal(size=(h, w, 16)).astype(np.float32)
  params = rng.normal(0, 0.5, (n, 233)).astype(np.float32)
  locs = rng.uniform(0, 40, (n, 2)).astype(np.float32)
  soi = np.array([64., 128., 1024.][:n], np.float32)
  return feats, params, locs, soi


def test_layout_matches_explicit_loop_at_stride_8():
  feats, params, locs, soi = _case()
  got = dmh.dynamic_mask_logits(jnp.asarray(feats), jnp.asarray(params),
                                jnp.asarray(locs), jnp.asarray(soi),
                                mask_out_stride=8)
  np.testing.assert_allclose(got, _loop_head(feats, params, locs, soi),
                             rtol=1e-4, atol=1e-4)


def test_stride_4_is_aligned_bilinear_x2():
  feats, params, locs, soi = _case(1)
  got = dmh.dynamic_mask_logits(jnp.asarray(feats), jnp.asarray(params),
                                jnp.asarray(locs), jnp.asarray(soi))
  assert got.shape == (3, 8, 10)
  s8 = _loop_head(feats, params, locs, soi)
  expected = aligned_bilinear(jnp.asarray(s8[..., None], jnp.float32), 2)
  np.testing.assert_allclose(got, expected[..., 0], rtol=1e-4, atol=1e-4)


def test_rel_coords_sign_and_soi():
  # Only W0[0, 0] (rel_x -> hidden 0) = 1; W1[0, 0] = 1; W2[0, 0] = 1, so the
  # logit is relu(rel_x) = relu((inst_x - px) / soi).
  p = np.zeros((1, 233), np.float32)
  p[0, 0] = 1.0
  p[0, 144] = 1.0
  p[0, 208] = 1.0
  feats = np.zeros((2, 3, 16), np.float32)
  got = np.asarray(dmh.dynamic_mask_logits(
      jnp.asarray(feats), jnp.asarray(p), jnp.array([[20., 0.]]),
      jnp.array([128.]), mask_out_stride=8))
  # px = 4, 12, 20 -> (20 - px) / 128 = 16/128, 8/128, 0.
  np.testing.assert_allclose(got[0], [[0.125, 0.0625, 0.0]] * 2, atol=1e-7)


def test_batched_matches_per_image():
  feats, params, locs, soi = _case(2)
  feats_b = jnp.stack([jnp.asarray(feats), jnp.asarray(feats) * -0.5])
  params_b = jnp.stack([jnp.asarray(params), jnp.asarray(params[::-1])])
  locs_b = jnp.stack([jnp.asarray(locs), jnp.asarray(locs) + 3])
  soi_b = jnp.stack([jnp.asarray(soi), jnp.asarray(soi[::-1])])
  got = dmh.dynamic_mask_logits_batched(feats_b, params_b, locs_b, soi_b)
  for b in range(2):
    one = dmh.dynamic_mask_logits(feats_b[b], params_b[b], locs_b[b],
                                  soi_b[b])
    np.testing.assert_allclose(got[b], one, rtol=1e-6, atol=1e-6)


def test_param_count_checked_and_soi_table():
  with pytest.raises(ValueError, match='233'):
    dmh.dynamic_mask_logits(jnp.zeros((2, 2, 16)), jnp.zeros((1, 169)),
                            jnp.zeros((1, 2)), jnp.ones((1,)))
  # 8 mask channels -> 169 params (reference §2.3).
  w, b = dmh.parse_dynamic_params(jnp.zeros((4, 169)), 8)
  assert [x.shape for x in w] == [(4, 8, 10), (4, 8, 8), (4, 1, 8)]
  assert [x.shape for x in b] == [(4, 8), (4, 8), (4, 1)]
  np.testing.assert_array_equal(dmh.mask_head_soi(jnp.arange(5)),
                                [64, 128, 256, 512, 1024])


def test_gradient_finite():
  feats, params, locs, soi = _case(3)
  g = jax.grad(lambda p, f: dmh.dynamic_mask_logits(
      f, p, jnp.asarray(locs), jnp.asarray(soi)).sum(), argnums=(0, 1))(
          jnp.asarray(params), jnp.asarray(feats))
  assert all(np.isfinite(np.asarray(x)).all() for x in g)
