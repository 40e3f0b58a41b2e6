"""BoxSeg's Quality-Aware Module (§4B, §4C.4) from hand-made cases."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from boxseg_jax.methods import qam


def _sig(z):
  return 1.0 / (1.0 + math.exp(-z))


@pytest.mark.parametrize("interp,want", [("sqrt", [2, 2, 6, 10, 10]),
                                         ("area", [2, 2, 5, 10, 10])])
def test_adaptive_k_at_the_reference_areas(interp, want):
  sides = [20.0, 32.0, 64.0, 96.0, 200.0]
  boxes = jnp.array([[10.0, 10.0, 10.0 + s, 10.0 + s] for s in sides])
  # sqrt: K = round(2 + 8 (side - 32) / 64): 64 -> 6. area: K = round(2 +
  # 8 (area - 32^2) / (96^2 - 32^2)): 64^2 -> 2 + 8 * 3072 / 8192 = 5.
  got = qam.num_selected_per_gt(boxes, interp=interp)
  np.testing.assert_array_equal(np.asarray(got), want)
  # The area is measured in original-image pixels: a 32 px box in a view
  # resized by 0.5 is a 64 px object.
  half = qam.num_selected_per_gt(boxes[1:2], jnp.array([0.5, 0.5]),
                                 interp=interp)
  assert int(half[0]) == want[2]
  fixed = qam.num_selected_per_gt(boxes, mode="fixed", k=20)
  np.testing.assert_array_equal(np.asarray(fixed), [20] * 5)


def _rank(cands, labels, gt_label=1, k=2, class_agnostic=False, valid=None,
          class_filter="before_cut"):
  cands = jnp.asarray(cands, jnp.float32)
  valid = (jnp.ones(len(cands), bool) if valid is None
           else jnp.asarray(valid))
  idx, iou, keep = qam.box_quality_ranking(
      jnp.array([[0.0, 0.0, 10.0, 10.0]]), jnp.array([gt_label]),
      jnp.array([True]), jnp.array([k]), cands, jnp.asarray(labels), valid,
      max_k=3, class_agnostic=class_agnostic, class_filter=class_filter)
  return np.asarray(idx[0]), np.asarray(iou[0]), np.asarray(keep[0])


def test_bqr_ranks_by_iou_not_by_score():
  # Box scores play no part in the ranking: candidate 0 (IoU 0.6) would be
  # the best by score, candidates 1 (IoU 0.9) and 2 (IoU 0.8) rank first.
  cands = [[0, 0, 10, 6], [0, 0, 10, 9], [0, 0, 10, 8]]
  idx, iou, keep = _rank(cands, [1, 1, 1])
  np.testing.assert_array_equal(idx, [1, 2, 0])
  np.testing.assert_allclose(iou, [0.9, 0.8, 0.6], rtol=1e-6)
  # K = 2: the third is cut even though it passes the IoU filter.
  np.testing.assert_array_equal(keep, [True, True, False])
  # The fusion weights of the kept pair ignore candidate 0's high score.
  scores = jnp.array([[0.4, 0.9, 0.6]])[:, idx]
  w, _ = qam.fusion_weights(scores, jnp.asarray(iou)[None],
                            jnp.asarray(keep)[None])
  assert float(w[0, 2]) == 0.0


def test_bqr_class_and_iou_filters_run_after_the_cut_in_the_code_mode():
  # IoU 1.0 (class 0), 0.9 (class 1), 0.5 (class 1), 0.8 (class 1).
  cands = [[0, 0, 10, 10], [0, 0, 10, 9], [0, 0, 10, 5], [0, 0, 10, 8]]
  labels = [0, 1, 1, 1]
  idx, _, keep = _rank(cands, labels, k=2, class_filter="after_cut")
  # Top 2 by IoU are candidates 0 and 1; the wrong-class 0 is dropped and
  # not replaced by candidate 3.
  np.testing.assert_array_equal(idx, [0, 1, 3])
  np.testing.assert_array_equal(keep, [False, True, False])
  # Class-agnostic keeps it.
  _, _, keep = _rank(cands, labels, k=2, class_agnostic=True)
  np.testing.assert_array_equal(keep, [True, True, False])
  # The default (before the cut) ranks class 1 only: 0.9 and 0.8 are kept.
  idx, _, keep = _rank(cands, labels, k=2)
  np.testing.assert_array_equal(idx[:2], [1, 3])
  np.testing.assert_array_equal(keep, [True, True, False])
  # IoU must exceed 0.5 strictly; invalid candidates never count.
  idx, _, keep = _rank([[0, 0, 10, 5], [0, 0, 10, 9]], [1, 1], k=3,
                       valid=[True, False])
  assert not keep.any()


def test_bqr_class_filter_before_the_cut_ranks_only_the_gts_class():
  # One location per box, duplicated per class as the candidates are (one
  # per (location, class)): boxes of IoU 1.0 and 0.9 for classes 0 and 2,
  # a box of IoU 0.8 for class 1 (the GT's).
  cands = [[0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 9], [0, 0, 10, 9],
           [0, 0, 10, 8]]
  labels = [0, 2, 0, 2, 1]
  # After the cut (the code), K = 2 is filled by wrong-class copies: the GT
  # keeps nothing.
  idx, _, keep = _rank(cands, labels, k=2, class_filter="after_cut")
  np.testing.assert_array_equal(idx[:2], [0, 1])
  assert not keep.any()
  # Before the cut, only class 1 is ranked: candidate 4 first, kept; the
  # other slots hold no candidate (IoU -1 -> 0, not kept).
  idx, iou, keep = _rank(cands, labels, k=2, class_filter="before_cut")
  assert idx[0] == 4
  np.testing.assert_allclose(iou, [0.8, 0.0, 0.0], rtol=1e-6)
  np.testing.assert_array_equal(keep, [True, False, False])
  # Class-agnostic ignores the filter either way.
  _, _, keep = _rank(cands, labels, k=2, class_agnostic=True,
                     class_filter="before_cut")
  np.testing.assert_array_equal(keep, [True, True, False])
  with pytest.raises(ValueError, match="class_filter"):
    _rank(cands, labels, class_filter="sideways")
  with pytest.raises(ValueError, match="qam.class_filter"):
    qam.QAMConfig(class_filter="sideways")


def test_fusion_weights_sum_to_one_and_vanish_at_tau():
  b = jnp.array([[0.9, 0.4, 0.1, 0.05], [0.1, 0.1, 0.0, 0.0]])
  iou = jnp.array([[0.9, 0.6, 0.8, 0.9], [0.9, 0.9, 0.0, 0.0]])
  keep = jnp.array([[True, True, True, True], [True, True, False, False]])
  w, used = qam.fusion_weights(b, iou, keep, tau=0.1)
  # sqrt(0.9 * 0.9) = 0.9, sqrt(0.4 * 0.6) = 0.4899; b = 0.1 (= tau) and
  # 0.05 (< tau) get 0.
  raw = [0.9, math.sqrt(0.24)]
  np.testing.assert_allclose(
      w[0], [raw[0] / sum(raw), raw[1] / sum(raw), 0.0, 0.0], rtol=1e-5)
  assert float(w[0].sum()) == pytest.approx(1.0)
  np.testing.assert_array_equal(used[0], [True, True, False, False])
  # Every candidate at or below tau: no weight at all, so no pseudo mask.
  np.testing.assert_array_equal(w[1], [0.0] * 4)
  assert not used[1].any()
  # top1: the first used (highest-IoU) candidate alone.
  w1, _ = qam.fusion_weights(b, iou, keep, fusion="top1")
  np.testing.assert_array_equal(w1, [[1.0, 0, 0, 0], [0, 0, 0, 0]])


def test_majority_vote_even_tie_is_background():
  # Two used candidates on a 1x3 grid: both, one, none above 0.5.
  probs = jnp.array([[[[0.9, 0.8, 0.2]], [[0.7, 0.4, 0.1]]]])
  box = jnp.ones((1, 1, 3))
  w, _ = qam.fusion_weights(jnp.array([[0.9, 0.9]]), jnp.array([[0.8, 0.8]]),
                            jnp.ones((1, 2), bool), fusion="vote")
  soft = qam.fuse_masks(probs, w, fusion="vote")
  np.testing.assert_allclose(soft, [[[1.0, 0.5, 0.0]]])
  mask = qam.binarise(soft, box, fusion="vote")
  np.testing.assert_array_equal(mask, [[[True, False, False]]])
  # Three candidates: 2 of 3 votes is a majority.
  probs3 = jnp.concatenate([probs, jnp.array([[[[0.1, 0.9, 0.1]]]])], 1)
  w3, _ = qam.fusion_weights(jnp.full((1, 3), 0.9), jnp.full((1, 3), 0.8),
                             jnp.ones((1, 3), bool), fusion="vote")
  mask3 = qam.binarise(qam.fuse_masks(probs3, w3, fusion="vote"), box,
                       fusion="vote")
  np.testing.assert_array_equal(mask3, [[[True, True, False]]])
  # The weighted soft fusion of the same pair (equal weights): 0.6 at the
  # tie pixel, foreground; clipped to the box.
  soft_w = qam.fuse_masks(probs, jnp.array([[0.5, 0.5]]))
  np.testing.assert_allclose(soft_w, [[[0.8, 0.6, 0.15]]], rtol=1e-6)
  clip = jnp.array([[[1.0, 1.0, 0.0]]])
  np.testing.assert_array_equal(qam.binarise(soft_w, clip),
                                [[[True, True, False]]])


def test_mqs_paper_by_hand():
  soft = jnp.array([[[0.9, 0.7], [0.6, 0.3]], [[0.4, 0.2], [0.1, 0.0]]])
  box = jnp.array([[[1.0, 1.0], [0.0, 1.0]], [[1.0, 1.0], [1.0, 1.0]]])
  s = qam.mqs_paper(soft, box, jnp.array([0.64, 0.9]))
  # GT 0: in the box and > 0.5: 0.9, 0.7 (0.6 is outside the box) -> mean
  # 0.8; s = sqrt(0.64 * 0.8). GT 1: nothing above 0.5 -> 0.
  np.testing.assert_allclose(s, [math.sqrt(0.64 * 0.8), 0.0], rtol=1e-6)


def test_mqs_code_by_hand():
  # One GT, two candidates on a 1x4 grid; V = candidates' majority.
  probs = jnp.array([[[[0.9, 0.8, 0.0, 0.0]], [[0.6, 0.0, 0.7, 0.0]]]])
  fused = jnp.array([[[True, True, False, False]]])
  b = jnp.array([[0.6, 0.2]])
  s = qam.mqs_code(probs, fused, b, jnp.ones((1, 2), bool))
  # k=0: B = {0, 1} = V: IoU 1, a = (0.9 + 0.8) * 1 / 2 = 0.85;
  #      sqrt((1 + 0.6) / 2 * 0.85) = sqrt(0.68).
  # k=1: B = {0, 2}: |B & V| = 1, |B | V| = 3, IoU 1/3,
  #      a = (0.6 + 0.7) / 3 / 2 = 0.21667; sqrt(0.6 * 0.21667) = sqrt(0.13).
  want = (math.sqrt(0.8 * 0.85) + math.sqrt(0.6 * 1.3 / 6)) / 2
  assert float(s[0]) == pytest.approx(want, rel=1e-5)
  # Unused candidates do not count.
  s1 = qam.mqs_code(probs, fused, b, jnp.array([[True, False]]))
  assert float(s1[0]) == pytest.approx(math.sqrt(0.68), rel=1e-5)


# End to end: hand-built teacher outputs on a 64x64 canvas, 2 classes.
# P3 locations (stride 8) are (8 j + 4, 8 i + 4), index 8 i + j.
_NUM_LOC = 86
_P = 169  # dynamic head parameters for 8 mask channels


def _outputs():
  cls = np.full((_NUM_LOC, 2), -10.0, np.float32)
  reg = np.ones((_NUM_LOC, 4), np.float32)
  ctr = np.full((_NUM_LOC,), 10.0, np.float32)
  ctrl = np.zeros((_NUM_LOC, _P), np.float32)
  ctrl[:, -1] = 5.0   # last bias: every mask is sigmoid(5) everywhere

  def put(i, j, label, prob, box):
    loc, x, y = 8 * i + j, 8 * j + 4, 8 * i + 4
    cls[loc, label] = math.log(prob / (1 - prob))
    reg[loc] = np.array([x - box[0], y - box[1], box[2] - x, box[3] - y]) / 8

  put(2, 2, 0, 0.9, (8, 8, 40, 40))    # GT 0's box, wrong class
  put(3, 3, 1, 0.6, (8, 8, 40, 36))    # IoU 0.875, right class
  put(2, 3, 1, 0.95, (8, 8, 40, 39))   # IoU 31/32, right class
  return {"cls_logits": jnp.asarray(cls), "reg": jnp.asarray(reg),
          "ctrness": jnp.asarray(ctr), "controller": jnp.asarray(ctrl),
          "mask_feats": jnp.zeros((8, 8, 8))}


_GT = dict(gt_boxes=jnp.array([[8.0, 8.0, 40.0, 40.0], [48.0, 48.0, 60.0,
                                                         60.0],
                               [0.0, 0.0, 0.0, 0.0]]),
           gt_labels=jnp.array([1, 0, -1]),
           gt_valid=jnp.array([True, True, False]))


def _labels(**cfg):
  valid = jnp.ones((64, 64), bool)
  fn = jax.jit(lambda o, b, l, g: qam.pseudo_labels_one(
      o, valid, valid, b, l, g, jnp.ones(2), qam.QAMConfig(**cfg)))
  return fn(_outputs(), _GT["gt_boxes"], _GT["gt_labels"], _GT["gt_valid"])


def test_pseudo_labels_end_to_end_paper_defaults():
  q = _sig(5.0)  # every candidate's mask probability
  box = np.zeros((16, 16), np.float32)
  box[2:10, 2:10] = 1.0  # stride-4 samples 4 i + 2 in [8, 40]: 10..38
  # GT 0 (side 32 -> K = 2). The class filter before the cut (default):
  # the two right-class candidates (b 0.95, 0.6) fill K and are used;
  # after it (the code): the top 2 by IoU are the wrong-class perfect box
  # and the 0.95 candidate, so only the latter is used.
  for mode, used, mean_b in (("before_cut", 2, (0.95 + 0.6) / 2),
                             ("after_cut", 1, 0.95)):
    out = _labels(class_filter=mode)
    np.testing.assert_array_equal(np.asarray(out["num_used"]), [used, 0, 0])
    np.testing.assert_array_equal(np.asarray(out["has"]),
                                  [True, False, False])
    # Every map is q everywhere: the fused mask is the box.
    np.testing.assert_array_equal(np.asarray(out["pseudo_masks"][0]), box)
    # Flag = sqrt(mean used b · mean of M inside the box) = sqrt(b̄ q).
    assert float(out["pseudo_flags"][0]) == pytest.approx(
        math.sqrt(mean_b * q), rel=1e-5)
  out = _labels()
  np.testing.assert_array_equal(np.asarray(out["num_used"]), [2, 0, 0])
  # GT 1 has no candidate with IoU > 0.5: no mask, flag 0.
  assert not np.asarray(out["pseudo_masks"][1:]).any()
  np.testing.assert_array_equal(np.asarray(out["pseudo_flags"][1:]), [0, 0])
  assert float(out["num_detections"]) == 3


def test_pseudo_labels_end_to_end_code_options():
  q = _sig(5.0)
  c = [math.sqrt(0.6 * _sig(10.0)), math.sqrt(0.95 * _sig(10.0))]
  out = _labels(k_mode="fixed", k=20, box_score="fcos", fusion="vote",
                mqs="code")
  # Fixed K = 20: both right-class candidates are used.
  np.testing.assert_array_equal(np.asarray(out["num_used"]), [2, 0, 0])
  # Every candidate covers the whole image: V = image, a_k = q, so
  # s = mean_k sqrt((1 + c_k) / 2 · q).
  want = np.mean([math.sqrt((1 + ck) / 2 * q) for ck in c])
  assert float(out["pseudo_flags"][0]) == pytest.approx(want, rel=1e-5)
  assert float(out["pseudo_flags"][1]) == 0.0
  # τ above every box score: nothing is used.
  none = _labels(tau=0.99)
  assert not np.asarray(none["has"]).any()
  assert not np.asarray(none["pseudo_flags"]).any()


def test_static_shapes_and_one_compilation():
  valid = jnp.ones((64, 64), bool)
  cfg = qam.QAMConfig()

  @jax.jit
  def fn(outputs, boxes, labels, gt_valid):
    return qam.pseudo_labels_one(outputs, valid, valid, boxes, labels,
                                 gt_valid, jnp.ones(2), cfg)

  a = fn(_outputs(), _GT["gt_boxes"], _GT["gt_labels"], _GT["gt_valid"])
  b = fn(_outputs(), _GT["gt_boxes"] * 0.5, jnp.array([0, 0, 1]),
         jnp.array([True, True, True]))
  assert a["pseudo_masks"].shape == b["pseudo_masks"].shape == (3, 16, 16)
  assert fn._cache_size() == 1  # pylint: disable=protected-access


def test_config_rejects_unknown_options():
  with pytest.raises(ValueError, match="qam.fusion"):
    qam.QAMConfig(fusion="max")
  with pytest.raises(ValueError, match="k_min"):
    qam.QAMConfig(k_min=12)


def test_fusing_on_the_teacher_grid_equals_fusing_resampled_maps():
  # Student: a 48x48 image on a 64x64 canvas; teacher: the same image at
  # 64x64. Random mask features and controllers give non-trivial maps; the
  # weighted fusion computed before resampling (paper path) and after
  # resampling every candidate (forced by mqs="code") must agree.
  rng = np.random.default_rng(0)
  outputs = dict(_outputs())
  ctrl = rng.normal(0, 1, (_NUM_LOC, _P)).astype(np.float32)
  outputs["controller"] = jnp.asarray(ctrl)
  outputs["mask_feats"] = jnp.asarray(rng.normal(0, 1, (8, 8, 8)),
                                      jnp.float32)
  sv = np.zeros((64, 64), bool)
  sv[:48, :48] = True
  tv = jnp.ones((64, 64), bool)
  gts = _GT["gt_boxes"] * 0.75

  def run(mqs):
    return jax.jit(lambda o: qam.pseudo_labels_one(
        o, jnp.asarray(sv), tv, gts, _GT["gt_labels"], _GT["gt_valid"],
        jnp.ones(2), qam.QAMConfig(k_mode="fixed", mqs=mqs)))(outputs)

  fused_first, per_candidate = run("paper"), run("code")
  assert float(fused_first["soft_masks"][0].max()) > 0.1
  np.testing.assert_allclose(fused_first["soft_masks"],
                             per_candidate["soft_masks"], atol=1e-5)
  # Nothing outside the student's image.
  assert not np.asarray(fused_first["soft_masks"][:, 12:, :]).any()
