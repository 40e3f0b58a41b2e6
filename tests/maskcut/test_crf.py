"""Host post-processing: CRF unary, fill holes, IoU check, resize."""

import numpy as np
import pytest

from boxseg_jax.maskcut import crf


def test_unary_is_neg_log_softmax_of_one_minus_mask_and_mask():
  mask = np.array([[0, 1], [1, 0]], np.float64)
  u = crf.unary_from_mask(mask)
  p_in = np.e / (1 + np.e)  # softmax([0, 1])[1] = 0.7311
  assert u.shape == (2, 4) and u.dtype == np.float32
  np.testing.assert_allclose(u[1], -np.log([1 - p_in, p_in, p_in, 1 - p_in]),
                             rtol=1e-6)
  np.testing.assert_allclose(u[0], -np.log([p_in, 1 - p_in, 1 - p_in, p_in]),
                             rtol=1e-6)


def test_iou_below_reference_semantics():
  z = np.zeros((2, 2))
  assert not crf.iou_below(z, z)  # NaN < 0.5 is False
  a = np.array([[1, 1], [0, 0]])
  assert not crf.iou_below(a, np.array([[1, 0], [0, 0]]))  # 0.5 is not < 0.5
  assert crf.iou_below(a, np.array([[1, 0], [1, 1]]))  # 1 / 4


def test_resize_mask_thresholds_at_half_max():
  m = np.zeros((4, 4), bool)
  m[1:3, 1:3] = True
  up = crf.resize_mask(m, (8, 8))
  assert up.shape == (8, 8)
  # Bicubic 2x of a 2 x 2 block: the block interior stays, the far
  # background stays empty, and the result is symmetric.
  assert up[3:5, 3:5].all() and not up[0].any() and not up[:, 0].any()
  np.testing.assert_array_equal(up, up[::-1, ::-1])
  np.testing.assert_array_equal(crf.resize_mask(m, (4, 4)), m)
  assert not crf.resize_mask(np.zeros((4, 4), bool), (9, 7)).any()
  assert crf.resize_mask(np.zeros((4, 4), bool), (9, 7)).shape == (7, 9)


def test_postprocess_without_crf_fills_holes_and_resizes():
  m = np.zeros((6, 6), bool)
  m[1:5, 1:5] = True
  m[2, 2] = False  # a hole
  out = crf.postprocess_mask(np.zeros((6, 6, 3), np.uint8), m, (6, 6),
                             use_crf=False)
  expect = np.zeros((6, 6), bool)
  expect[1:5, 1:5] = True
  np.testing.assert_array_equal(out, expect)
  assert crf.postprocess_mask(np.zeros((6, 6, 3), np.uint8),
                              np.zeros((6, 6), bool), (6, 6),
                              use_crf=False) is None


def test_densecrf_snaps_to_the_object():
  pytest.importorskip("pydensecrf.densecrf")
  img = np.full((48, 48, 3), 30, np.uint8)
  img[12:36, 10:34] = 220
  truth = np.zeros((48, 48), bool)
  truth[12:36, 10:34] = True
  coarse = np.zeros((48, 48), bool)
  coarse[8:32, 8:32] = True  # shifted, patch-like mask
  refined = crf.densecrf(img, coarse) >= 0.5

  def iou(a, b):
    return np.sum(a & b) / np.sum(a | b)

  assert iou(refined, truth) > iou(coarse, truth) + 0.2
  out = crf.postprocess_mask(img, coarse, (96, 96), use_crf=True)
  assert out.shape == (96, 96) and iou(out[::2, ::2], truth) > 0.9


def test_densecrf_unary_matches_pydensecrf_utils():
  utils = pytest.importorskip("pydensecrf.utils")
  m = (np.random.default_rng(0).random((5, 7)) > 0.5).astype(np.float64)
  logits = np.stack([1 - m, m])
  p = np.exp(logits) / np.exp(logits).sum(0)
  np.testing.assert_allclose(crf.unary_from_mask(m),
                             utils.unary_from_softmax(p), rtol=1e-6)


def test_crf_discards_masks_it_disagrees_with():
  pytest.importorskip("pydensecrf.densecrf")
  img = np.full((40, 40, 3), 128, np.uint8)
  mask = np.zeros((40, 40), bool)
  mask[:, 20] = True  # a 1-pixel line on a flat image: the CRF removes it
  assert crf.postprocess_mask(img, mask, (40, 40), use_crf=True) is None
