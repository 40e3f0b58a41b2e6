"""Tests for boxseg_jax.ops.nms against a straightforward numpy greedy NMS."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from boxseg_jax.ops.nms import batched_nms, batched_nms_mask


def _iou_np(a, b):
  """torchvision box_iou for one box vs many (numpy, float64)."""
  x0 = np.maximum(a[0], b[:, 0])
  y0 = np.maximum(a[1], b[:, 1])
  x1 = np.minimum(a[2], b[:, 2])
  y1 = np.minimum(a[3], b[:, 3])
  inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
  area_a = (a[2] - a[0]) * (a[3] - a[1])
  area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
  return inter / (area_a + area_b - inter)


def _greedy_nms_np(boxes, scores, labels, valid, thr):
  """Per-class greedy NMS, result sorted by descending score."""
  idx = [i for i in np.argsort(-scores, kind='stable') if valid[i]]
  keep = []
  for i in idx:
    ok = True
    for j in keep:
      if labels[j] == labels[i] and _iou_np(boxes[j], boxes[i:i + 1])[0] > thr:
        ok = False
        break
    if ok:
      keep.append(i)
  return keep


def _random_case(rng, m, num_classes):
  xy = rng.uniform(0, 60, (m, 2))
  wh = rng.uniform(4, 40, (m, 2))
  boxes = np.concatenate([xy, xy + wh], 1).astype(np.float32)
  scores = rng.uniform(0, 1, m).astype(np.float32)
  labels = rng.integers(0, num_classes, m).astype(np.int32)
  valid = rng.uniform(size=m) < 0.8
  return boxes, scores, labels, valid


@pytest.mark.parametrize('seed,num_classes,thr', [(0, 1, 0.5), (1, 3, 0.6),
                                                   (2, 2, 0.3)])
def test_matches_numpy_greedy(seed, num_classes, thr):
  rng = np.random.default_rng(seed)
  boxes, scores, labels, valid = _random_case(rng, 120, num_classes)
  expected = _greedy_nms_np(boxes.astype(np.float64), scores, labels, valid,
                            thr)
  fn = jax.jit(lambda *a: batched_nms(*a, iou_threshold=thr, max_output=200))
  idx, keep_valid = fn(boxes, scores, labels, valid)
  got = np.asarray(idx)[np.asarray(keep_valid)].tolist()
  assert got == expected
  assert len(expected) > 5


def test_max_output_truncates_to_top_scores():
  rng = np.random.default_rng(3)
  boxes, scores, labels, valid = _random_case(rng, 80, 2)
  expected = _greedy_nms_np(boxes.astype(np.float64), scores, labels, valid,
                            0.5)
  assert len(expected) > 7
  idx, keep_valid = batched_nms(jnp.asarray(boxes), jnp.asarray(scores),
                                jnp.asarray(labels), jnp.asarray(valid),
                                iou_threshold=0.5, max_output=7)
  assert np.asarray(keep_valid).all()
  assert np.asarray(idx).tolist() == expected[:7]


def test_class_aware_hand_case():
  boxes = jnp.array([[0., 0., 10., 10.], [1., 0., 11., 10.],
                     [1., 0., 11., 10.], [50., 50., 60., 60.]])
  scores = jnp.array([0.9, 0.8, 0.7, 0.1])
  labels = jnp.array([0, 0, 1, 0])
  valid = jnp.array([True, True, True, False])
  # Box 1 overlaps box 0 with IoU 90/110 > 0.6 (same class): suppressed.
  # Box 2 has the same geometry but another class: kept. Box 3 invalid.
  idx, keep_valid = batched_nms(boxes, scores, labels, valid,
                                iou_threshold=0.6, max_output=4)
  assert np.asarray(idx)[np.asarray(keep_valid)].tolist() == [0, 2]
  assert np.asarray(keep_valid).tolist() == [True, True, False, False]
  mask = batched_nms_mask(boxes, scores, labels, valid, iou_threshold=0.6,
                          max_output=4)
  assert np.asarray(mask).tolist() == [True, False, True, False]
  # IoU exactly at the threshold is not suppressed (strict >):
  # [0,0,4,4] vs [0,0,4,2] -> 8 / 16 = 0.5 exactly.
  two = jnp.array([[0., 0., 4., 4.], [0., 0., 4., 2.]])
  args = (two, jnp.array([0.9, 0.8]), jnp.array([0, 0]), jnp.ones(2, bool))
  _, keep_valid = batched_nms(*args, iou_threshold=0.5, max_output=2)
  assert np.asarray(keep_valid).tolist() == [True, True]
  _, keep_valid = batched_nms(*args, iou_threshold=0.49, max_output=2)
  assert np.asarray(keep_valid).tolist() == [True, False]


def test_no_valid_candidates():
  idx, keep_valid = batched_nms(jnp.zeros((5, 4)), jnp.zeros(5),
                                jnp.zeros(5, jnp.int32), jnp.zeros(5, bool),
                                iou_threshold=0.5, max_output=3)
  assert not np.asarray(keep_valid).any()
  assert np.asarray(idx).tolist() == [0, 0, 0]
