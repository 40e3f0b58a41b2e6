"""Tests for boxseg_jax.ops.boxes (hand-computed cases)."""

import math

import jax
import jax.numpy as jnp
import numpy as np

from boxseg_jax.ops import boxes as box_ops


def test_box_area():
  b = jnp.array([[0., 0., 2., 3.], [1., 1., 1., 5.]])
  np.testing.assert_allclose(box_ops.box_area(b), [6., 0.])


def test_pairwise_iou_hand():
  a = jnp.array([[0., 0., 2., 2.], [0., 0., 1., 1.]])
  b = jnp.array([[1., 1., 3., 3.], [5., 5., 6., 6.], [0., 0., 0., 0.]])
  iou = box_ops.pairwise_iou(a, b)
  # [0,0,2,2] vs [1,1,3,3]: inter 1, union 4 + 4 - 1 = 7.
  # [0,0,1,1] vs [1,1,3,3]: touching corner -> inter 0.
  expected = [[1 / 7, 0., 0.], [0., 0., 0.]]
  np.testing.assert_allclose(iou, expected, rtol=1e-6)


def test_iou_to_many_matches_pairwise():
  rng = np.random.default_rng(0)
  xy = rng.uniform(0, 50, (20, 2))
  wh = rng.uniform(1, 30, (20, 2))
  b = jnp.asarray(np.concatenate([xy, xy + wh], 1), jnp.float32)
  full = box_ops.pairwise_iou(b, b)
  row = box_ops.iou_to_many(b[3], b)
  np.testing.assert_allclose(row, full[3], rtol=1e-6)


def test_ltrb_roundtrip_and_hand():
  points = jnp.array([[10., 20.]])
  ltrb = jnp.array([[1., 2., 3., 4.]])
  # stride 8: (10 - 8, 20 - 16, 10 + 24, 20 + 32).
  boxes = box_ops.ltrb_to_xyxy(points, ltrb, jnp.array([8.]))
  np.testing.assert_allclose(boxes, [[2., 4., 34., 52.]])
  back = box_ops.xyxy_to_ltrb(points, boxes, jnp.array([8.]))
  np.testing.assert_allclose(back, ltrb)


def test_iou_giou_ltrb_hand():
  pred = jnp.array([[1., 1., 1., 1.], [1., 0., 1., 2.]])
  target = jnp.array([[2., 2., 2., 2.], [0., 1., 2., 1.]])
  iou, giou = box_ops.iou_giou_ltrb(pred, target)
  # Case 0: A_p = 2*2 = 4, A_t = 4*4 = 16, I = (1+1)(1+1) = 4,
  # U = 16 + 4 - 4 = 16, IoU = (4+1)/(16+1) = 5/17; C = (2+2)(2+2) = 16 = U.
  # Case 1: A_p = (1+1)(0+2) = 4, A_t = (0+2)(1+1) = 4,
  # I = (min(1,0)+min(1,2)) * (min(0,1)+min(2,1)) = 1 * 1 = 1, U = 7,
  # IoU = 2/8; C = (1+2)(1+2) = 9, GIoU = 1/4 - (9-7)/9.
  np.testing.assert_allclose(iou, [5 / 17, 0.25], rtol=1e-6)
  np.testing.assert_allclose(giou, [5 / 17, 0.25 - 2 / 9], rtol=1e-6)


def test_iou_giou_ltrb_gradient_finite():
  pred = jnp.array([[0., 0., 0., 0.], [1., 2., 3., 4.]])
  target = jnp.array([[1., 1., 1., 1.], [2., 2., 2., 2.]])
  g = jax.grad(lambda p: box_ops.iou_giou_ltrb(p, target)[1].sum())(pred)
  assert np.isfinite(np.asarray(g)).all()
  assert not math.isclose(float(jnp.abs(g).sum()), 0.0)
