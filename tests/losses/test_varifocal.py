"""Varifocal classification loss (BoxSeg §4C.3) from hand-computed values."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from boxseg_jax.losses import fcos


def _sig(z):
  return 1.0 / (1.0 + math.exp(-z))


def test_varifocal_loss_three_entries_by_hand():
  z = jnp.array([0.0, 2.0, -1.0])
  t = jnp.array([0.8, 0.0, 0.0])
  # Positive (t = 0.8): BCE(0, 0.8) = log 2, weight t = 0.8.
  # Negatives: weight 0.25 sigmoid(z)^2, BCE(z, 0) = log(1 + e^z).
  want = [0.8 * math.log(2.0),
          0.25 * _sig(2.0) ** 2 * math.log1p(math.exp(2.0)),
          0.25 * _sig(-1.0) ** 2 * math.log1p(math.exp(-1.0))]
  np.testing.assert_allclose(want, [0.5545177, 0.4125195, 0.0056645],
                             rtol=1e-5)
  np.testing.assert_allclose(fcos.varifocal_loss(z, t), want, rtol=1e-5)
  # VarifocalNet's alpha 0.75 triples the negatives only.
  got = fcos.varifocal_loss(z, t, alpha=0.75)
  np.testing.assert_allclose(got, [want[0], 3 * want[1], 3 * want[2]],
                             rtol=1e-5)


def test_fcos_losses_varifocal_targets_are_the_iou():
  # One image, 2 locations, 3 classes. Location 0 is positive for class 1
  # with predicted ltrb (1, 1, 1, 1) against the target (1, 1, 2, 1):
  # IoU = (I + 1) / (U + 1) = (4 + 1) / (6 + 1) = 5/7. Location 1: negative.
  outputs = {
      'cls_logits': jnp.array([[[0.5, 1.0, -2.0], [-1.0, 0.0, 3.0]]]),
      'reg': jnp.array([[[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]]]),
      'ctrness': jnp.array([[0.0, 0.0]]),
  }
  targets = {
      'labels': jnp.array([[1, 3]]),
      'reg_targets': jnp.array([[[1.0, 1.0, 2.0, 1.0], [0.0] * 4]]),
      'ctrness': jnp.array([[math.sqrt(0.5), 0.0]]),
      'positive': jnp.array([[True, False]]),
  }
  iou = 5.0 / 7.0
  out = fcos.fcos_losses(outputs, targets, cls_loss='varifocal')

  def neg(z):
    return 0.25 * _sig(z) ** 2 * math.log1p(math.exp(z))

  pos = -(iou * math.log(_sig(1.0)) + (1 - iou) * math.log(1 - _sig(1.0)))
  want = pos * iou + neg(0.5) + neg(-2.0) + neg(-1.0) + neg(0.0) + neg(3.0)
  assert float(out['loss_fcos_cls']) == pytest.approx(want, rel=1e-5)
  # The box and quality losses do not depend on the classification loss.
  focal = fcos.fcos_losses(outputs, targets)
  for key in ('loss_fcos_loc', 'loss_fcos_ctr', 'num_pos'):
    assert float(out[key]) == float(focal[key])
  with pytest.raises(ValueError, match='cls_loss'):
    fcos.fcos_losses(outputs, targets, cls_loss='softmax')
