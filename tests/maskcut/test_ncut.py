"""Normalized Cut pieces: graph, eigen-solvers, foreground rule, flood fill."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
from scipy import ndimage

from boxseg_jax.maskcut import ncut

EPS = 1e-5


def _two_block_feats(grid_hw, left_cols):
  """Patches in the first `left_cols` columns get e0, the rest e1."""
  h, w = grid_hw
  f = np.zeros((h, w, 4), np.float32)
  f[:, :left_cols, 0] = 1.0
  f[:, left_cols:, 1] = 2.0  # norm does not matter, direction does
  return f.reshape(h * w, 4)


def test_affinity_hand_case():
  feats = np.array([[1, 0], [1, 1], [0, 0], [-1, 0.2]], np.float32)
  a = np.asarray(ncut.affinity(jnp.asarray(feats), tau=0.5, eps=EPS))
  # cos(f0, f1) = 0.7071 > 0.5; the zero patch has eps everywhere, even on
  # its own diagonal; cos(f3, f0) = -0.981 and cos(f3, f1) = -0.555 -> eps;
  # every non-zero patch has self-similarity 1.
  expect = np.array([[1, 1, EPS, EPS],
                     [1, 1, EPS, EPS],
                     [EPS, EPS, EPS, EPS],
                     [EPS, EPS, EPS, 1]], np.float32)
  np.testing.assert_allclose(a, expect, rtol=1e-6)


@pytest.mark.parametrize("solver",
                         ["eigh", "lobpcg", "lobpcg_deflate", "lanczos"])
@pytest.mark.parametrize("left_cols", [3, 2])
def test_two_blocks_are_split_exactly(solver, left_cols):
  grid = (5, 6)
  feats = _two_block_feats(grid, left_cols)
  n = grid[0] * grid[1]
  m1 = grid[0] * left_cols
  m2 = n - m1

  def fn(f):
    a = ncut.affinity(f, 0.15, EPS, dtype=jnp.float64)
    if solver == "eigh":
      x, lam, _ = ncut.fiedler_eigh(a)
    elif solver == "lanczos":
      x, lam, _ = ncut.fiedler_lanczos(a)
    else:
      x, lam, _ = ncut.fiedler_lobpcg(a, num_iters=200,
                                      deflate=solver == "lobpcg_deflate")
    bip, seed = ncut.select_foreground(x, grid)
    return x, lam, bip, seed

  with ncut.precision_scope("float64"):
    x, lam, bip, seed = jax.jit(fn)(jnp.asarray(feats))
    x = np.asarray(x)
  left = np.zeros(grid, bool)
  left[:, :left_cols] = True
  left = left.ravel()
  # Hand-derived: x = (a on block 1, b on block 2), d_k = m_k + eps m_other.
  # Row of block 1: (d1 - m1) a - eps m2 b = lambda d1 a, i.e.
  # eps m2 (a - b) = lambda d1 a; D-orthogonality to 1: m1 d1 a + m2 d2 b = 0;
  # so lambda = eps (m1 d1 + m2 d2) / (d1 d2), and x^T D x = 1 fixes a.
  # Every other eigenvalue is 1 (within-block zero-sum vectors).
  d1, d2 = m1 + EPS * m2, m2 + EPS * m1
  a_val = np.sqrt(1.0 / (m1 * d1 * (1 + (m1 * d1) / (m2 * d2))))
  b_val = -a_val * m1 * d1 / (m2 * d2)
  lam_expect = EPS * (m1 * d1 + m2 * d2) / (d1 * d2)
  sign = np.sign(x[0])
  np.testing.assert_allclose(sign * x[left], a_val, rtol=1e-6)
  np.testing.assert_allclose(sign * x[~left], b_val, rtol=1e-6)
  np.testing.assert_allclose(float(lam), lam_expect, rtol=1e-6)
  # The split is exact, whatever the sign.
  bip = np.asarray(bip)
  assert np.array_equal(bip, left) or np.array_equal(bip, ~left)


def test_two_blocks_foreground_is_sign_independent():
  # Corners: 2 per block, so the corner rule does not fire for either sign.
  grid = (4, 6)
  feats = _two_block_feats(grid, 3)
  with ncut.precision_scope("float64"):
    a = ncut.affinity(jnp.asarray(feats), 0.15, EPS, dtype=jnp.float64)
    x, _, _ = jax.jit(ncut.fiedler_eigh)(a)
    for tie in (0.0, 1e-5):
      b1, s1 = ncut.select_foreground(x, grid, tie)
      b2, s2 = ncut.select_foreground(-x, grid, tie)
      np.testing.assert_array_equal(b1, b2)
      assert int(s1) == int(s2)


def test_eigh_matches_scipy_generalized_problem():
  rng = np.random.default_rng(0)
  protos = rng.standard_normal((3, 16))
  labels = rng.integers(0, 3, 48)
  feats = (protos[labels] + 0.8 * rng.standard_normal((48, 16))).astype(
      np.float32)
  with ncut.precision_scope("float64"):
    a = ncut.affinity(jnp.asarray(feats), 0.15, EPS, dtype=jnp.float64)
    x, lam, _ = jax.jit(ncut.fiedler_eigh)(a)
    lobpcg = {deflate: jax.jit(functools.partial(ncut.fiedler_lobpcg,
                                                 deflate=deflate))(a)
              for deflate in (True, False)}
    lanczos = jax.jit(ncut.fiedler_lanczos)(a)
    a = np.asarray(a)
    x = np.asarray(x)
  d = a.sum(1)
  vals, vecs = scipy.linalg.eigh(np.diag(d) - a, np.diag(d),
                                 subset_by_index=[1, 2])
  ref = vecs[:, 0]
  s = np.sign(np.dot(ref, x))
  np.testing.assert_allclose(s * x, ref, atol=1e-10)
  np.testing.assert_allclose(x @ (d * x), 1.0, rtol=1e-10)
  np.testing.assert_allclose(float(lam), vals[0], rtol=1e-9)
  for xl, laml, iters in list(lobpcg.values()) + [lanczos]:
    xl = np.asarray(xl)
    s = np.sign(np.dot(ref, xl))
    np.testing.assert_allclose(s * xl, ref, atol=1e-6)
    np.testing.assert_allclose(float(laml), vals[0], rtol=1e-6)
    assert int(iters) < 48  # converged on tolerance, not on a cap


def test_corner_rule_hand_case_and_its_sign_dependence():
  grid = (4, 4)
  x = np.ones(16)
  x[[5, 6, 9, 10]] = -1.0  # centre
  x[2] = 3.0  # a border cell with the largest |x|
  # mean = 10 / 16. For x: bip = border (4 corners) -> reversed -> centre,
  # seed = argmax(-x) = 5 (first of the ties).
  bip, seed = ncut.select_foreground(jnp.asarray(x), grid)
  centre = np.zeros(16, bool)
  centre[[5, 6, 9, 10]] = True
  np.testing.assert_array_equal(np.asarray(bip), centre)
  assert int(seed) == 5
  # For -x: bip = centre, no corner; seed_abs = 2 is not in it -> reversed
  # -> the border, seed = argmax(x) = 2. The sign changes the result here,
  # as in the reference (reference-algorithms §5.4).
  bip, seed = ncut.select_foreground(jnp.asarray(-x), grid)
  np.testing.assert_array_equal(np.asarray(bip), ~centre)
  assert int(seed) == 2


def test_foreground_rule_is_sign_invariant_without_corner_rule():
  rng = np.random.default_rng(1)
  grid = (6, 7)
  checked = 0
  fn = jax.jit(lambda v: ncut.select_foreground(v, grid))
  for _ in range(200):
    x = rng.standard_normal(42)
    corners = ncut.corner_indices(grid)
    if ((x > x.mean())[corners].sum() >= 3 or
        (-x > -x.mean())[corners].sum() >= 3):
      continue
    b1, s1 = fn(jnp.asarray(x))
    b2, s2 = fn(jnp.asarray(-x))
    np.testing.assert_array_equal(b1, b2)
    assert int(s1) == int(s2)
    assert bool(b1[int(s1)])
    checked += 1
  assert checked > 50


def test_first_argmax_ties():
  v = jnp.asarray([0.5, 1.0 - 1e-6, 1.0, 1.0], jnp.float32)
  assert int(ncut.first_argmax(v)) == 2
  assert int(ncut.first_argmax(v, 1e-5)) == 1
  assert int(ncut.first_argmax(v, 1e-7)) == 2
  assert int(ncut.first_argmax(jnp.asarray([3.0, 1.0]), 1e-6)) == 0


def _np_component(region, seed):
  labels, _ = ndimage.label(region)
  lab = labels.ravel()[seed]
  return (labels == lab) if lab > 0 else np.zeros_like(region)


def test_connected_component_matches_scipy_label():
  rng = np.random.default_rng(2)
  fn = jax.jit(ncut.connected_component)
  for p in (0.45, 0.6, 0.75):
    for _ in range(10):
      region = rng.random((13, 17)) < p
      seed = int(rng.integers(0, region.size))
      got = np.asarray(fn(jnp.asarray(region), seed))
      np.testing.assert_array_equal(got, _np_component(region, seed))


def test_connected_component_long_snake():
  # A serpentine path of ~ h * w / 2 cells needs many dilation steps.
  h, w = 15, 15
  region = np.zeros((h, w), bool)
  region[::2, :] = True
  for r in range(1, h, 2):
    region[r, (w - 1) if (r // 2) % 2 == 0 else 0] = True
  region[0, 0] = True
  got = np.asarray(jax.jit(ncut.connected_component)(jnp.asarray(region), 0))
  np.testing.assert_array_equal(got, region)
  # Vertical neighbours only through the cross: diagonal contacts do not
  # connect.
  diag = np.eye(5, dtype=bool)
  got = np.asarray(ncut.connected_component(jnp.asarray(diag), 0))
  assert got.sum() == 1 and got[0, 0]


def test_iou_above_reference_semantics():
  a = jnp.asarray([True, True, False, False])
  assert not bool(ncut.iou_above(jnp.zeros(4, bool), jnp.zeros(4, bool)))
  # IoU = 1 / 2: strict comparison -> False.
  assert not bool(ncut.iou_above(a, jnp.asarray([True, False, False, False])))
  # IoU = 2 / 3 -> True.
  assert bool(ncut.iou_above(a, jnp.asarray([True, True, True, False])))


def test_float64_needs_the_precision_scope():
  a = jnp.ones((12, 12))
  with pytest.raises(ValueError, match="precision_scope"):
    ncut.check_precision("float64")
  with pytest.raises(ValueError, match="solve_dtype"):
    ncut.check_precision("float16")
  ncut.check_precision("float32")
  with ncut.precision_scope("float64"):
    ncut.check_precision("float64")
  del a
