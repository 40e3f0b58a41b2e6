"""Tests for boxseg_jax.targets (FCOS target assignment, reference §1.4)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from boxseg_jax import targets as targets_lib
from boxseg_jax.ops.locations import fcos_locations

C = 3


def _locs(h=64, w=64):
  locs = fcos_locations(h, w)
  return (jnp.asarray(locs.points), jnp.asarray(locs.levels),
          jnp.asarray(locs.strides), locs)


def _run(boxes, labels, valid, h=64, w=64, **kw):
  points, levels, strides, _ = _locs(h, w)
  fn = jax.jit(functools.partial(targets_lib.fcos_targets, num_classes=C,
                                 **kw))
  return jax.tree.map(np.asarray, fn(
      points, levels, strides, jnp.asarray(boxes, jnp.float32),
      jnp.asarray(labels, jnp.int32), jnp.asarray(valid, bool)))


def _index(locs, x, y, level):
  """Index of the location at pixel (x, y) on `level`."""
  hits = np.nonzero((locs.points[:, 0] == x) & (locs.points[:, 1] == y) &
                    (locs.levels == level))[0]
  assert len(hits) == 1
  return int(hits[0])


def test_center_sampling_min_area_and_invalid():
  _, _, _, locs = _locs()
  boxes = [[0, 0, 40, 40],     # GT0, area 1600, label 1
           [16, 16, 34, 34],   # GT1, area 324, label 2
           [16, 16, 34, 34],   # GT2, same area as GT1 (tie -> GT1)
           [0, 0, 64, 64]]     # GT3, invalid: never assigned
  t = _run(boxes, [1, 2, 0, 0], [True, True, True, False])
  # GT0: center (20, 20); P3 sub-box [20-12, 20+12]^2 = [8, 32]^2; P3 points
  # strictly inside: x, y in {12, 20, 28} (9 points), max(l,t,r,b) <= 28 so
  # all are in [-1, 64]. P4 points {8, 24} are inside the clipped sub-box
  # [0, 40]^2 but max reg >= 32 is not in [64, 128]: none there.
  # GT1: center (25, 25); P3 sub-box [13, 37] clipped to [16, 34]:
  # points {20, 28}^2 (4 points), smaller area than GT0 -> they go to GT1.
  gt1 = {(x, y) for x in (20, 28) for y in (20, 28)}
  gt0 = {(x, y) for x in (12, 20, 28) for y in (12, 20, 28)} - gt1
  expected = np.full(len(locs.levels), -1)
  for (x, y) in gt0:
    expected[_index(locs, x, y, 0)] = 0
  for (x, y) in gt1:
    expected[_index(locs, x, y, 0)] = 1
  np.testing.assert_array_equal(t['gt_index'], expected)
  np.testing.assert_array_equal(t['positive'], expected >= 0)
  lab = np.where(expected == 0, 1, np.where(expected == 1, 2, C))
  np.testing.assert_array_equal(t['labels'], lab)
  # Location (20, 20) -> GT1: l = t = 4, r = b = 14, / 8.
  i = _index(locs, 20, 20, 0)
  np.testing.assert_allclose(t['reg_targets'][i], [0.5, 0.5, 1.75, 1.75])
  np.testing.assert_allclose(t['ctrness'][i], 4 / 14, rtol=1e-6)
  # Location (12, 28) -> GT0: l = 12, t = 28, r = 28, b = 12, / 8;
  # ctr = sqrt(12/28 * 12/28) = 12/28.
  i = _index(locs, 12, 28, 0)
  np.testing.assert_allclose(t['reg_targets'][i], [1.5, 3.5, 3.5, 1.5])
  np.testing.assert_allclose(t['ctrness'][i], 12 / 28, rtol=1e-6)
  neg = expected < 0
  assert (t['reg_targets'][neg] == 0).all() and (t['ctrness'][neg] == 0).all()


def test_strictly_inside_sub_box():
  _, _, _, locs = _locs()
  # Box [0, 0, 24, 24], center (12, 12). Radius 1.0 * 8 -> sub-box [4, 20]^2;
  # P3 points 4 and 20 lie on its border (distance 0, not > 0): only (12, 12).
  t = _run([[0, 0, 24, 24]], [0], [True], center_sampling_radius=1.0)
  assert t['positive'].sum() == 1
  assert t['positive'][_index(locs, 12, 12, 0)]
  # Radius 1.5 -> sub-box [0, 24]^2 (clipped): {4, 12, 20}^2 = 9 points.
  t = _run([[0, 0, 24, 24]], [0], [True])
  assert t['positive'].sum() == 9


def test_size_ranges_inclusive_without_center_sampling():
  _, _, _, locs = _locs()
  # Box [0, 0, 68, 8]: P3 (4, 4) has l=4, t=4, r=64, b=4 -> max 64 is inside
  # [-1, 64] (inclusive). P3 (12, 4): max 56 -> positive too.
  t = _run([[0, 0, 68, 8]], [0], [True], center_sampling_radius=None)
  assert t['positive'][_index(locs, 4, 4, 0)]
  # Box [0, 0, 72, 12]: P4 (8, 8): l=8, t=8, r=64, b=4 -> 64 in [64, 128].
  t = _run([[0, 0, 72, 12]], [0], [True], center_sampling_radius=None)
  assert t['positive'][_index(locs, 8, 8, 1)]
  # P3 (4, 4) for that box: r = 68 > 64 -> not cared on P3.
  assert not t['positive'][_index(locs, 4, 4, 0)]
  # Degenerate box touching the location: l = 0 -> not inside.
  t = _run([[4, 0, 40, 12]], [0], [True], center_sampling_radius=None)
  assert not t['positive'][_index(locs, 4, 4, 0)]


def test_no_valid_instances_all_background():
  t = _run([[0, 0, 40, 40]], [1], [False])
  assert not t['positive'].any()
  assert (t['labels'] == C).all() and (t['gt_index'] == -1).all()


def _reference_loop(points, levels, strides, boxes, labels, valid, radius,
                    soi=(64, 128, 256, 512)):
  """Direct per-location loop written from reference §1.4 (numpy, f64)."""
  bounds = [-1] + list(soi) + [1e8]
  out_gt = np.full(len(points), -1)
  for k, ((x, y), lv, s) in enumerate(zip(points, levels, strides)):
    best, best_area = -1, np.inf
    for j, (x0, y0, x1, y1) in enumerate(boxes):
      if not valid[j]:
        continue
      cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
      sx0, sy0 = max(cx - radius * s, x0), max(cy - radius * s, y0)
      sx1, sy1 = min(cx + radius * s, x1), min(cy + radius * s, y1)
      if min(x - sx0, y - sy0, sx1 - x, sy1 - y) <= 0:
        continue
      m = max(x - x0, y - y0, x1 - x, y1 - y)
      if not bounds[lv] <= m <= bounds[lv + 1]:
        continue
      area = (x1 - x0) * (y1 - y0)
      if area < best_area:
        best, best_area = j, area
    out_gt[k] = best
  return out_gt


def test_random_boxes_match_reference_loop():
  rng = np.random.default_rng(0)
  h, w = 128, 96
  points, levels, strides, locs = _locs(h, w)
  n = 7
  xy = rng.uniform(0, 80, (n, 2))
  wh = rng.uniform(4, 120, (n, 2))
  boxes = np.concatenate([xy, np.minimum(xy + wh, [w, h])], 1)
  boxes = np.round(boxes * 4) / 4  # exact in float32 as in float64
  labels = rng.integers(0, C, n)
  valid = np.array([True] * 6 + [False])
  t = _run(boxes, labels, valid, h, w)
  expected = _reference_loop(locs.points.astype(np.float64), locs.levels,
                             locs.strides, boxes, labels, valid, 1.5)
  np.testing.assert_array_equal(t['gt_index'], expected)
  assert (expected >= 0).sum() > 20
  pos = expected >= 0
  ltrb = np.stack([locs.points[:, 0] - boxes[expected, 0],
                   locs.points[:, 1] - boxes[expected, 1],
                   boxes[expected, 2] - locs.points[:, 0],
                   boxes[expected, 3] - locs.points[:, 1]], 1)
  ltrb /= locs.strides[:, None]
  np.testing.assert_allclose(t['reg_targets'][pos], ltrb[pos], rtol=1e-5)
  np.testing.assert_array_equal(t['labels'][pos], labels[expected[pos]])


def test_ctrness_target_formula():
  r = jnp.array([[1., 2., 3., 4.], [2., 2., 2., 2.]])
  # sqrt(min(1,3)/max(1,3) * min(2,4)/max(2,4)) = sqrt(1/3 * 1/2).
  np.testing.assert_allclose(targets_lib.ctrness_target(r),
                             [np.sqrt(1 / 6), 1.0], rtol=1e-6)


def test_batch_vmap_matches_per_image():
  points, levels, strides, _ = _locs()
  boxes = jnp.array([[[0, 0, 40, 40], [0, 0, 0, 0]],
                     [[10, 10, 60, 30], [16, 16, 34, 34]]], jnp.float32)
  labels = jnp.array([[1, -1], [0, 2]])
  valid = jnp.array([[True, False], [True, True]])
  bt = jax.jit(functools.partial(targets_lib.batch_fcos_targets,
                                 num_classes=C))(points, levels, strides,
                                                 boxes, labels, valid)
  one_fn = jax.jit(functools.partial(targets_lib.fcos_targets, num_classes=C))
  for b in range(2):
    one = one_fn(points, levels, strides, boxes[b], labels[b], valid[b])
    for k in one:
      np.testing.assert_array_equal(bt[k][b], one[k])
