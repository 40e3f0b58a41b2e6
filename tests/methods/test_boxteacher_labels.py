"""BoxTeacher pseudo labels (reference §4.3-4.4) from hand-made cases."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from boxseg_jax.methods import boxteacher


def test_mask_aware_scores_tiny_mask():
  probs = jnp.array([[[0.9, 0.7], [0.2, 0.4]],
                     [[0.1, 0.2], [0.3, 0.4]]])  # second: empty mask
  region = jnp.ones((2, 2), bool)
  c = jnp.array([0.64, 0.5])
  mask_score, score = boxteacher.mask_aware_scores(c, probs, region)
  # M = {0.9, 0.7}: m̄ = 0.8 -> mask_score = sqrt(sqrt(.64) * .8) = 0.8,
  # score = sqrt(.64 * .8).
  assert float(mask_score[0]) == pytest.approx(0.8, rel=1e-5)
  assert float(score[0]) == pytest.approx(math.sqrt(0.64 * 0.8), rel=1e-5)
  assert float(mask_score[1]) == 0.0 and float(score[1]) == 0.0
  # Outside the image region nothing counts: only 0.9 is left.
  region = jnp.array([[True, False], [True, True]])
  _, score = boxteacher.mask_aware_scores(c, probs, region)
  assert float(score[0]) == pytest.approx(math.sqrt(0.64 * 0.9), rel=1e-5)


def _assign(dets, scores, gts, quirk=False, valid=None):
  dets = jnp.asarray(dets, jnp.float32)
  valid = jnp.ones(len(dets), bool) if valid is None else jnp.asarray(valid)
  return np.asarray(boxteacher.assign(
      dets, jnp.asarray(scores, jnp.float32), valid,
      jnp.asarray(gts, jnp.float32), jnp.ones(len(gts), bool), quirk=quirk))


def test_assign_greedy_order_and_quirk():
  gts = [[0, 0, 10, 10], [20, 0, 30, 10]]
  # NMS order det0, det1, det2; score order det2 (.95), det0 (.9), det1 (.5).
  dets = [[0, 0, 10, 10],    # IoU 1 with GT 0
          [0, 0, 10, 8],     # IoU .8 with GT 0
          [20, 0, 30, 10]]   # IoU 1 with GT 1
  scores = [0.9, 0.5, 0.95]
  np.testing.assert_array_equal(_assign(dets, scores, gts), [0, 2])
  # Quirk: GT 0 matched to detection *index 0* looks unmatched, so the
  # lower-scored det1 takes it.
  np.testing.assert_array_equal(_assign(dets, scores, gts, quirk=True),
                                [1, 2])
  # The quirk only concerns index 0: with det0 and det1 swapped in NMS order
  # the quirk changes nothing.
  swapped = [dets[1], dets[0], dets[2]]
  np.testing.assert_array_equal(
      _assign(swapped, [0.5, 0.9, 0.95], gts, quirk=True), [1, 2])
  # Invalid detections never match.
  np.testing.assert_array_equal(
      _assign(dets, scores, gts, valid=[False, True, False]), [1, -1])


def test_assign_iou_threshold_and_ties():
  gts = [[0, 0, 10, 10]]
  np.testing.assert_array_equal(_assign([[0, 0, 10, 5]], [1.0], gts), [0])
  np.testing.assert_array_equal(_assign([[0, 0, 10, 4.9]], [1.0], gts), [-1])
  # Equal IoU with two GTs: the later GT wins (reference `>=` scan).
  two = [[0, 0, 10, 10], [0, 0, 10, 10]]
  np.testing.assert_array_equal(_assign([[0, 0, 10, 10]], [1.0], two),
                                [-1, 0])
  # Among unmatched GTs the best IoU wins.
  gts = [[0, 0, 10, 10], [0, 0, 12, 10]]
  np.testing.assert_array_equal(_assign([[0, 0, 12, 10]], [1.0], gts),
                                [-1, 0])


def _dets(boxes, scores, masks):
  d = len(boxes)
  return {'boxes': jnp.asarray(boxes, jnp.float32),
          'scores': jnp.asarray(scores, jnp.float32),
          'labels': jnp.zeros(d, jnp.int32),
          'valid': jnp.ones(d, bool),
          'location_index': jnp.zeros(d, jnp.int32),
          'mask_probs': jnp.asarray(masks, jnp.float32)}


def test_pseudo_labels_teacher_at_4_3_scale():
  # Student: a 48x48 image on a 64x64 canvas; teacher: the same image at
  # test scale 64x64 on its own 64x64 canvas (student = 0.75 x teacher).
  sv = np.zeros((64, 64), bool)
  sv[:48, :48] = True
  tv = np.ones((64, 64), bool)
  masks = np.zeros((2, 16, 16), np.float32)
  masks[0, 4:12, :] = 0.9     # rows 16..47 of the teacher image
  masks[1, 0:2, 0:2] = 0.9    # a small blob top-left
  dets = _dets([[0, 16, 64, 48], [0, 0, 8, 8]], [0.81, 0.64], masks)
  gts = jnp.array([[0, 12, 48, 36], [30, 30, 40, 40], [0, 0, 0, 0]],
                  jnp.float32)
  out = boxteacher.pseudo_labels_one(dets, jnp.asarray(sv), jnp.asarray(tv),
                                     gts, jnp.array([True, True, False]))
  # Teacher box (0, 16, 64, 48) x 0.75 = (0, 12, 48, 36) = GT 0 exactly.
  np.testing.assert_array_equal(np.asarray(out['match']), [0, -1, -1])
  want = np.zeros((16, 16), np.float32)
  want[3:9, :12] = 1.0  # student rows 14..34 (see tests/ops/test_resample)
  np.testing.assert_array_equal(np.asarray(out['pseudo_masks'][0]), want)
  assert not np.asarray(out['pseudo_masks'][1:]).any()
  # Flag = mask_score = sqrt(sqrt(0.81) * 0.9) = 0.9.
  np.testing.assert_allclose(np.asarray(out['pseudo_flags']), [0.9, 0, 0],
                             rtol=1e-5)


def test_pseudo_labels_batch_metrics_with_monitor():
  sv = np.ones((2, 32, 32), bool)
  masks = np.zeros((2, 1, 8, 8), np.float32)
  masks[:, 0, 2:6, 2:6] = 0.95
  dets = jax.tree.map(lambda *x: jnp.stack(x), *[
      _dets([[8, 8, 24, 24]], [0.9], masks[b]) for b in range(2)])
  gt_masks = np.zeros((2, 2, 8, 8), np.float32)
  gt_masks[:, 0, 2:6, 2:4] = 1.0   # IoU with the pseudo mask: 8 / 16
  batch = {'image_valid': jnp.asarray(sv),
           'boxes': jnp.array([[[8, 8, 24, 24], [0, 0, 4, 4]]] * 2,
                              jnp.float32),
           'instance_valid': jnp.array([[True, True], [True, False]]),
           'example_valid': jnp.array([True, True]),
           'monitor_masks': jnp.asarray(gt_masks)}
  labels, metrics = boxteacher.pseudo_labels(dets, batch, jnp.asarray(sv))
  assert labels['pseudo_masks'].shape == (2, 2, 8, 8)
  # 2 of the 3 valid GTs have a pseudo mask.
  assert float(metrics['pseudo_fraction']) == pytest.approx(2 / 3)
  assert float(metrics['pseudo_iou']) == pytest.approx(0.5)
  flag = math.sqrt(math.sqrt(0.9) * 0.95)
  assert float(metrics['pseudo_flag_mean']) == pytest.approx(flag, rel=1e-5)
  # Without GT masks there is no IoU metric, and the labels are identical.
  no_gt = {k: v for k, v in batch.items() if k != 'monitor_masks'}
  labels2, metrics2 = boxteacher.pseudo_labels(dets, no_gt, jnp.asarray(sv))
  assert 'pseudo_iou' not in metrics2
  np.testing.assert_array_equal(labels2['pseudo_masks'],
                                labels['pseudo_masks'])
