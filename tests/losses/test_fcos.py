"""Tests for boxseg_jax.losses.fcos, hand-computed from reference §1.5."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from boxseg_jax.losses import fcos


def _sig(z):
  return 1.0 / (1.0 + math.exp(-z))


def _bce(z, t):
  p = _sig(z)
  return -(t * math.log(p) + (1 - t) * math.log(1 - p))


def _focal(z, t, a=0.25, g=2.0):
  p = _sig(z)
  pt = p * t + (1 - p) * (1 - t)
  at = a * t + (1 - a) * (1 - t)
  return at * _bce(z, t) * (1 - pt) ** g


def _giou(p, t):
  """GIoU of ltrb pairs written from the formula (python floats)."""
  ap = (p[0] + p[2]) * (p[1] + p[3])
  at = (t[0] + t[2]) * (t[1] + t[3])
  inter = (min(p[0], t[0]) + min(p[2], t[2])) * (min(p[1], t[1]) +
                                                 min(p[3], t[3]))
  union = ap + at - inter
  iou = (inter + 1) / (union + 1)
  c = (max(p[0], t[0]) + max(p[2], t[2])) * (max(p[1], t[1]) +
                                             max(p[3], t[3]))
  return iou, iou - (c - union) / c


def test_sigmoid_focal_loss_hand_values():
  z = jnp.array([0.0, 0.0, 2.0, -1.0])
  t = jnp.array([1.0, 0.0, 0.0, 1.0])
  # z=0,t=1: 0.25 * log 2 * 0.5^2; z=0,t=0: 0.75 * log 2 * 0.5^2.
  expected = [0.25 * math.log(2) * 0.25, 0.75 * math.log(2) * 0.25,
              _focal(2.0, 0.0), _focal(-1.0, 1.0)]
  np.testing.assert_allclose(fcos.sigmoid_focal_loss(z, t), expected,
                             rtol=1e-5)
  np.testing.assert_allclose(expected[:2], [0.0433217, 0.1299651], rtol=1e-5)


def _tiny_case():
  # One image, 3 locations, 2 classes. Loc 0: positive class 1, perfect box.
  # Loc 1: positive class 0. Loc 2: background.
  outputs = {
      'cls_logits': jnp.array([[[-1.0, 2.0], [0.5, -0.5], [-3.0, 1.0]]]),
      'reg': jnp.array([[[1., 1., 1., 1.], [2., 1., 1., 1.],
                         [0., 0., 0., 0.]]]),
      'ctrness': jnp.array([[0.3, -0.2, 4.0]]),
  }
  reg_t = [[1., 1., 1., 1.], [1., 3., 1., 1.], [0., 0., 0., 0.]]
  ctr_t = [1.0, math.sqrt(1.0 * (1 / 3)), 0.0]
  targets = {
      'labels': jnp.array([[1, 0, 2]]),
      'reg_targets': jnp.array([reg_t]),
      'ctrness': jnp.array([ctr_t], jnp.float32),
      'positive': jnp.array([[True, True, False]]),
  }
  return outputs, targets, reg_t, ctr_t


def test_fcos_losses_hand_case_ctrness():
  outputs, targets, reg_t, ctr_t = _tiny_case()
  got = fcos.fcos_losses(outputs, targets)
  logits = np.asarray(outputs['cls_logits'][0])
  onehot = [[0, 1], [1, 0], [0, 0]]
  num_pos = 2
  cls = sum(_focal(float(logits[i, c]), onehot[i][c])
            for i in range(3) for c in range(2)) / num_pos
  reg = np.asarray(outputs['reg'][0])
  g = [_giou(reg[i], reg_t[i])[1] for i in range(2)]
  # Loc 0: identical boxes -> IoU = (4+1)/(4+1) = 1, C = U -> GIoU = 1.
  assert g[0] == pytest.approx(1.0)
  loc = (ctr_t[0] * (1 - g[0]) + ctr_t[1] * (1 - g[1])) / (ctr_t[0] + ctr_t[1])
  ctr_logits = [0.3, -0.2]
  ctr = (_bce(ctr_logits[0], ctr_t[0]) + _bce(ctr_logits[1], ctr_t[1])) / 2
  assert float(got['num_pos']) == 2
  np.testing.assert_allclose(float(got['loss_fcos_cls']), cls, rtol=1e-5)
  np.testing.assert_allclose(float(got['loss_fcos_loc']), loc, rtol=1e-5)
  np.testing.assert_allclose(float(got['loss_fcos_ctr']), ctr, rtol=1e-5)


def test_fcos_losses_hand_case_iou_quality():
  outputs, targets, reg_t, _ = _tiny_case()
  got = fcos.fcos_losses(outputs, targets, box_quality='iou')
  reg = np.asarray(outputs['reg'][0])
  ig = [_giou(reg[i], reg_t[i]) for i in range(2)]
  loc = sum(1 - g for _, g in ig) / 2
  ctr = (_bce(0.3, ig[0][0]) + _bce(-0.2, ig[1][0])) / 2
  np.testing.assert_allclose(float(got['loss_fcos_loc']), loc, rtol=1e-5)
  np.testing.assert_allclose(float(got['loss_fcos_ctr']), ctr, rtol=1e-5)
  # The IoU target is detached: d loss_ctr / d reg comes only via nothing.
  grad = jax.grad(lambda r: fcos.fcos_losses(
      dict(outputs, reg=r), targets, box_quality='iou')['loss_fcos_ctr'])(
          outputs['reg'])
  assert float(jnp.abs(grad).sum()) == 0.0


def test_global_normalisation_and_example_valid():
  outputs, targets, _, _ = _tiny_case()
  two = jax.tree.map(lambda x: jnp.concatenate([x, x], 0), outputs)
  two_t = jax.tree.map(lambda x: jnp.concatenate([x, x], 0), targets)
  one = fcos.fcos_losses(outputs, targets)
  both = fcos.fcos_losses(two, two_t)
  # Duplicating the image doubles sums and counts: same normalised losses.
  for k in ('loss_fcos_cls', 'loss_fcos_loc', 'loss_fcos_ctr'):
    np.testing.assert_allclose(float(both[k]), float(one[k]), rtol=1e-6)
  assert float(both['num_pos']) == 4
  # An invalid second image contributes nothing, whatever its outputs.
  noisy = jax.tree.map(lambda x: x.at[1].set(x[1] * 3 + 1), two)
  masked = fcos.fcos_losses(noisy, two_t, jnp.array([True, False]))
  for k in ('loss_fcos_cls', 'loss_fcos_loc', 'loss_fcos_ctr'):
    np.testing.assert_allclose(float(masked[k]), float(one[k]), rtol=1e-6)


def test_no_positives_finite_and_normalised_by_one():
  outputs, targets, _, _ = _tiny_case()
  targets = dict(targets, positive=jnp.zeros((1, 3), bool))
  got = fcos.fcos_losses(outputs, targets)
  logits = np.asarray(outputs['cls_logits'][0])
  cls = sum(_focal(float(logits[i, c]), 0.0) for i in range(3)
            for c in range(2))
  np.testing.assert_allclose(float(got['loss_fcos_cls']), cls, rtol=1e-5)
  assert float(got['loss_fcos_loc']) == 0.0
  assert float(got['loss_fcos_ctr']) == 0.0
  grads = jax.grad(lambda o: sum(
      v for k, v in fcos.fcos_losses(o, targets).items()
      if k.startswith('loss')))(outputs)
  for g in jax.tree.leaves(grads):
    assert np.isfinite(np.asarray(g)).all()


def test_gradient_finite_with_zero_regression():
  outputs, targets, _, _ = _tiny_case()
  outputs = dict(outputs, reg=jnp.zeros((1, 3, 4)))
  grads = jax.grad(lambda o: fcos.fcos_losses(o, targets)['loss_fcos_loc'])(
      outputs)
  assert np.isfinite(np.asarray(grads['reg'])).all()
  assert float(jnp.abs(grads['reg'][0, 2]).sum()) == 0.0  # background


def test_cls_location_weight():
  outputs, targets, _, _ = _tiny_case()
  w = jnp.array([[1.0, 1.0, 0.0]])
  got = fcos.fcos_losses(outputs, targets, cls_location_weight=w)
  logits = np.asarray(outputs['cls_logits'][0])
  onehot = [[0, 1], [1, 0]]
  cls = sum(_focal(float(logits[i, c]), onehot[i][c])
            for i in range(2) for c in range(2)) / 2
  np.testing.assert_allclose(float(got['loss_fcos_cls']), cls, rtol=1e-5)
