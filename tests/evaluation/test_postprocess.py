"""Tests for boxseg_jax.evaluation.postprocess (reference §1.6, §2.6)."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from pycocotools import mask as mask_utils

from boxseg_jax.evaluation import postprocess
from boxseg_jax.ops.aligned_bilinear import aligned_bilinear
from boxseg_jax.ops.locations import fcos_locations

H = W = 64
C = 3


def _index(x, y, level):
  locs = fcos_locations(H, W)
  hits = np.nonzero((locs.points[:, 0] == x) & (locs.points[:, 1] == y) &
                    (locs.levels == level))[0]
  return int(hits[0])


def _mask_params():
  """Dynamic params whose logit is relu(relu(10 f0 - 5)) - 2.5.

  f0 = mask feature channel 0: inside the region f0 = 1 -> +2.5, outside
  -2.5. Layout: W0 [8, 18] at 0 (feature 0 is input column 2), W1 at 144,
  W2 at 208, b0 at 216, b1 at 224, b2 at 232.
  """
  p = np.zeros(233, np.float32)
  p[0 * 18 + 2] = 10.0
  p[216] = -5.0
  p[144] = 1.0
  p[208] = 1.0
  p[232] = -2.5
  return p


def _synthetic_outputs():
  num_loc = fcos_locations(H, W).points.shape[0]
  cls = np.full((num_loc, C), -10.0, np.float32)
  ctr = np.full((num_loc,), -10.0, np.float32)
  reg = np.ones((num_loc, 4), np.float32)
  ctrl = np.zeros((num_loc, 233), np.float32)
  i = _index(28, 28, 0)  # P3 location (28, 28)
  cls[i, 2] = 5.0
  ctr[i] = 5.0
  reg[i] = [2.0, 1.5, 1.0, 0.5]  # x stride 8 -> box (12, 16, 36, 32)
  ctrl[i] = _mask_params()
  feats = np.zeros((H // 8, W // 8, 16), np.float32)
  feats[2:4, 2:5, 0] = 1.0  # canvas pixels rows 16..31, cols 16..39
  return {'cls_logits': jnp.asarray(cls), 'reg': jnp.asarray(reg),
          'ctrness': jnp.asarray(ctr), 'controller': jnp.asarray(ctrl),
          'mask_feats': jnp.asarray(feats)}, i


@functools.lru_cache(maxsize=None)
def _detect_fn(**kw):
  return jax.jit(functools.partial(postprocess.detect, **kw))


def test_detect_single_strong_detection():
  outputs, i = _synthetic_outputs()
  det = jax.device_get(_detect_fn(max_detections=10)(outputs))
  assert det['valid'].tolist() == [True] + [False] * 9
  np.testing.assert_allclose(det['boxes'][0], [12, 16, 36, 32])
  # sqrt(σ(5) σ(5)) = σ(5).
  assert det['scores'][0] == pytest.approx(1 / (1 + math.exp(-5)), rel=1e-6)
  assert det['labels'][0] == 2 and det['location_index'][0] == i
  assert det['mask_probs'].shape == (10, 16, 16)
  m = det['mask_probs'][0]
  # aligned_bilinear x2: stride-4 index o samples stride-8 cell (o - 1) / 2,
  # so cells 2..3 (rows) / 2..4 (cols) are o = 5..7 / 5..9: σ(2.5) = 0.924;
  # o = 4 sits half-way between logits -2.5 and 2.5: σ(0) = 0.5.
  assert m[5:8, 5:10].min() > 0.92
  assert m[4, 5:10] == pytest.approx(0.5)
  assert m[12:, :].max() < 0.1 and m[:, 13:].max() < 0.1
  assert (det['mask_probs'][1:] == 0).all()


def test_threshold_and_class_aware_nms():
  outputs, i = _synthetic_outputs()
  j = _index(36, 28, 0)  # neighbour, same box geometry shifted by 8 px
  cls = outputs['cls_logits'].at[j, 2].set(4.0).at[j, 0].set(4.0)
  ctr = outputs['ctrness'].at[j].set(5.0)
  reg = outputs['reg'].at[j].set(jnp.array([3.0, 1.5, 0.0, 0.5]))
  out2 = dict(outputs, cls_logits=cls, ctrness=ctr, reg=reg)
  det = jax.device_get(_detect_fn(max_detections=10)(out2))
  # Loc j decodes to the same box (12, 16, 36, 32): same class 2 -> IoU 1
  # suppressed; class 0 survives. Scores sqrt(σ(4)σ(5)) < σ(5).
  assert det['valid'].sum() == 2
  assert det['labels'][:2].tolist() == [2, 0]
  assert det['location_index'][:2].tolist() == [i, j]
  s = math.sqrt(1 / (1 + math.exp(-4)) / (1 + math.exp(-5)))
  assert det['scores'][1] == pytest.approx(s, rel=1e-6)
  # thresh 0.05 on q: q = σ(5)σ(-10) ≈ 4.5e-5 elsewhere -> nothing else.
  # Raising the threshold above σ(4)σ(5) ≈ 0.976 keeps only the best.
  det = jax.device_get(_detect_fn(max_detections=10, score_thresh=0.98)(out2))
  assert det['valid'].sum() == 1


def test_candidates_topk_per_level():
  outputs, _ = _synthetic_outputs()
  cls = outputs['cls_logits'].at[:].set(3.0)
  ctr = outputs['ctrness'].at[:].set(3.0)
  cand = jax.jit(functools.partial(
      postprocess.fcos_candidates, canvas_shape=(H, W), pre_nms_topk=20))(
          dict(outputs, cls_logits=cls, ctrness=ctr))
  # Levels 8x8, 4x4, 2x2, 1x1, 1x1 with 3 classes: min(20, L_l * 3).
  assert cand['valid'].shape == (20 + 20 + 12 + 3 + 3,)
  assert cand['valid'].all()
  np.testing.assert_array_equal(np.bincount(np.asarray(cand['level'])),
                                [20, 20, 12, 3, 3])


def test_resize_matrix_hand_case():
  # in 2 -> out 4, align_corners=False: sources -0.25 (-> 0), 0.25, 0.75,
  # 1.25 (upper tap clamped): [x0, .75x0 + .25x1, .25x0 + .75x1, x1].
  m = postprocess.resize_matrix(2, 4)
  np.testing.assert_allclose(m, [[1, 0], [.75, .25], [.25, .75], [0, 1]])
  # Downsampling 4 -> 2: sources 0.5 and 2.5.
  np.testing.assert_allclose(postprocess.resize_matrix(4, 2),
                             [[.5, .5, 0, 0], [0, 0, .5, .5]])


def test_paste_masks_matches_composition():
  rng = np.random.default_rng(0)
  probs = rng.uniform(size=(3, 16, 16)).astype(np.float32)
  up = np.asarray(aligned_bilinear(jnp.asarray(probs[..., None]), 4))[..., 0]
  crop = up[:, :48, :60].astype(np.float64)
  expected = np.einsum('oh,nhw,pw->nop', postprocess.resize_matrix(48, 97),
                       crop, postprocess.resize_matrix(60, 75))
  got = postprocess.paste_masks(probs, resized_size=(48, 60),
                                orig_size=(97, 75))
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_paste_masks_matches_torch_interpolate():
  torch = pytest.importorskip('torch')
  rng = np.random.default_rng(1)
  probs = rng.uniform(size=(2, 16, 16)).astype(np.float32)
  up = np.asarray(aligned_bilinear(jnp.asarray(probs[..., None]), 4))[..., 0]
  for orig in ((97, 75), (30, 20)):
    ref = torch.nn.functional.interpolate(
        torch.from_numpy(np.ascontiguousarray(up[:, None, :48, :60])),
        size=orig, mode='bilinear', align_corners=False)[:, 0].numpy()
    got = postprocess.paste_masks(probs, resized_size=(48, 60),
                                  orig_size=orig)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


def test_to_coco_predictions_end_to_end():
  outputs, _ = _synthetic_outputs()
  det = jax.device_get(_detect_fn(max_detections=10)(outputs))
  res = postprocess.to_coco_predictions(
      det, image_id=42, resized_size=(48, 64), orig_size=(96, 128),
      label_to_category_id=[7, 8, 9])
  assert len(res) == 1
  r = res[0]
  assert r['image_id'] == 42 and r['category_id'] == 9
  # Box (12, 16, 36, 32) x 2 -> (24, 32, 72, 64) -> [x, y, w, h].
  np.testing.assert_allclose(r['bbox'], [24, 32, 48, 32])
  assert r['score'] == pytest.approx(1 / (1 + math.exp(-5)), rel=1e-6)
  assert isinstance(r['segmentation']['counts'], str)
  rle = dict(r['segmentation'], counts=r['segmentation']['counts'].encode())
  m = mask_utils.decode(rle)
  assert m.shape == (96, 128)
  # Feature region: canvas rows 16..31, cols 16..39 -> original x 2:
  # rows 32..63, cols 32..79 (32 x 48 = 1536 px), softened by interpolation.
  assert m[48, 56] == 1 and m[10, 10] == 0 and m[90, 120] == 0
  assert abs(int(m.sum()) - 1536) < 0.2 * 1536
  ys, xs = np.nonzero(m)
  assert 26 <= ys.min() <= 38 and 58 <= ys.max() <= 70
  assert 26 <= xs.min() <= 38 and 74 <= xs.max() <= 86


def test_to_coco_clips_and_drops_empty_boxes():
  det = {
      'boxes': np.array([[-5., 2., 30., 70.], [70., 10., 90., 20.],
                         [1., 1., 5., 5.]], np.float32),
      'scores': np.array([.9, .8, .7], np.float32),
      'labels': np.array([0, 1, 1]),
      'valid': np.array([True, True, False]),
  }
  res = postprocess.to_coco_predictions(
      det, image_id=1, resized_size=(64, 64), orig_size=(64, 64),
      label_to_category_id=[1, 2])
  # Box 0 clipped to (0, 2, 30, 64); box 1 starts right of the image (x0 =
  # 70 > 64 -> clipped to zero width) and is dropped; box 2 is invalid.
  assert len(res) == 1
  np.testing.assert_allclose(res[0]['bbox'], [0, 2, 30, 62])
  assert 'segmentation' not in res[0]


def test_boxfill_baselines_hand_case():
  # One detection, canvas box (12, 16, 36, 32) on a 48x64 resized image of a
  # 96x128 original; its mask probabilities are exactly the grid box fill.
  boxes = np.array([[12., 16., 36., 32.]], np.float32)
  grid = postprocess.grid_box_masks(boxes, (12, 16), 4)
  # Sample pixels 4j+2 in [12, 36] -> j = 3..8; 4i+2 in [16, 32] -> i = 4..7.
  want = np.zeros((12, 16), np.float32)
  want[4:8, 3:9] = 1.0
  np.testing.assert_array_equal(grid[0], want)
  det = {'boxes': boxes, 'scores': np.array([0.9], np.float32),
         'labels': np.array([0]), 'valid': np.array([True]),
         'mask_probs': grid}
  r = postprocess.to_coco_predictions(
      det, image_id=1, resized_size=(48, 64), orig_size=(96, 128),
      label_to_category_id=[5], boxfill=True)[0]
  dec = lambda rle: mask_utils.decode(dict(rle, counts=rle['counts'].encode()))
  crisp = dec(r['segmentation_boxfill'])
  # Original box (24, 32, 72, 64): exactly 48 x 32 pixels.
  assert crisp.sum() == 48 * 32
  assert crisp[32:64, 24:72].all()
  # The grid fill goes through the same paste-back as predicted masks, so a
  # head predicting exactly the box grid equals the grid baseline.
  assert r['segmentation_boxfill_grid'] == r['segmentation']
  assert r['score'] == pytest.approx(0.9)


def test_mask_aware_rescoring():
  probs = np.full((2, 8, 8), 0.2, np.float32)
  probs[0, 2:6, 2:6] = 0.8      # m̄ = 0.8
  scores = np.array([0.5, 0.4], np.float32)  # second mask empty: m̄ = 0
  got = postprocess.mask_aware_scores(scores, probs)
  np.testing.assert_allclose(got, [math.sqrt(0.5 * 0.8), 0.0], rtol=1e-5)
  det = {'boxes': np.array([[0., 0., 32., 32.]], np.float32),
         'scores': np.array([0.5], np.float32), 'labels': np.array([0]),
         'valid': np.array([True]), 'mask_probs': probs[:1]}
  r = postprocess.to_coco_predictions(
      det, image_id=1, resized_size=(32, 32), orig_size=(32, 32),
      label_to_category_id=[1], rescore=True)[0]
  # Pasted at the original size the fg mean stays close to 0.8.
  assert r['score'] == pytest.approx(math.sqrt(0.5 * 0.8), abs=0.02)
