"""Tests for boxseg_jax.losses.dice (reference §2.5)."""

import numpy as np

from boxseg_jax.losses.dice import dice_loss


def test_dice_hand_values():
  x = np.array([[1.0, 0.0, 0.5, 0.5], [0.0, 0.0, 0.0, 0.0]], np.float32)
  t = np.array([[1.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]], np.float32)
  # Row 0: Σxt = 1 + 0.5 = 1.5; Σx² = 1 + 0.25 + 0.25 = 1.5; Σt² = 2.
  # Row 1: everything 0 -> 1 - 0 / 1e-5 = 1.
  expected = [1 - 3.0 / (3.5 + 1e-5), 1.0]
  np.testing.assert_allclose(dice_loss(x, t), expected, rtol=1e-6)


def test_dice_perfect_and_shapes():
  t = np.zeros((3, 4, 5), np.float32)
  t[:, 1:3, 2:4] = 1
  got = np.asarray(dice_loss(t, t))
  # 1 - 2*4 / (4 + 4 + 1e-5)
  np.testing.assert_allclose(got, [1 - 8 / (8 + 1e-5)] * 3, atol=1e-7)
  assert (got > 0).all()  # the eps keeps a perfect match just above 0
