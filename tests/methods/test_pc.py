"""BoxSeg's Peer-assisted Copy-paste (§4C.6, §4C.8 rows 14-25) from
hand-made tiny cases: admission, keys, capacity and eviction, use-once,
placement, occlusion and box re-derivation, canvas and padding, the empty
bank, and the per-device banks of a 4-device mesh.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from boxseg_jax.losses import boxinst
from boxseg_jax.methods import pc
from boxseg_jax.ops import boxes as box_ops

REPO = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
S = 4
paste_one = jax.jit(pc.paste_one, static_argnames="cfg")


def _example(boxes, labels, flags, scores, canvas=(64, 64), n=6,
             valid_hw=None, value=10):
  """One example dict of `paste_one`, pseudo masks = the box masks."""
  h, w = canvas
  num = len(boxes)
  b = np.zeros((n, 4), np.float32)
  b[:num] = boxes
  v = np.arange(n) < num
  lab = np.full((n,), -1, np.int32)
  lab[:num] = labels
  fl = np.zeros((n,), np.float32)
  fl[:num] = flags
  sc = np.zeros((n,), np.float32)
  sc[:num] = scores
  iv = np.zeros((h, w), bool)
  vh, vw = valid_hw or canvas
  iv[:vh, :vw] = True
  masks = np.asarray(boxinst.box_masks_at_stride(
      jnp.asarray(b), (h // S, w // S), S)) * v[:, None, None]
  image = np.full((h, w, 3), value, np.uint8) * iv[..., None]
  return dict(image=jnp.asarray(image),
              image_teacher=jnp.asarray(image + 1),
              image_valid=jnp.asarray(iv), boxes=jnp.asarray(b),
              labels=jnp.asarray(lab), instance_valid=jnp.asarray(v),
              example_valid=jnp.asarray(True),
              pseudo_masks=jnp.asarray(masks, jnp.float32),
              pseudo_flags=jnp.asarray(fl), pseudo_scores=jnp.asarray(sc))


def _bank(cfg, entries):
  """A one-device bank (no leading axis, no rng) holding `entries`:
  (offset, [(mask cell rows, mask cell cols, box, label, score)], pixel)."""
  bank = pc.init_bank(cfg, 1, jax.random.PRNGKey(0))
  bank = {k: np.array(v[0]) for k, v in bank.items() if k != "rng"}
  for e, (offset, objects, pixel) in enumerate(entries):
    bank["valid"][e] = True
    bank["offset"][e] = offset
    bank["image"][e] = pixel
    bank["image_color"][e] = pixel + 1
    for k, (rows, cols, box, label, score) in enumerate(objects):
      bank["masks"][e, k, rows[0]:rows[1], cols[0]:cols[1]] = True
      bank["boxes"][e, k] = box
      bank["labels"][e, k] = label
      bank["scores"][e, k] = score
      bank["object_valid"][e, k] = True
  return {k: jnp.asarray(v) for k, v in bank.items()}


def test_paste_probability_schedules():
  code = pc.PCConfig(ramp_steps=10000)
  ramp = pc.PCConfig(ramp_steps=10000, schedule="rampup")
  for t, want in ((0, 1.0), (5000, 0.65), (10000, 0.3), (50000, 0.3)):
    assert float(pc.paste_probability(t, code)) == pytest.approx(want)
    assert float(pc.paste_probability(t, ramp)) == pytest.approx(1 - want)


def test_admission_rejects_overlapping_low_score_and_small_objects():
  cfg = pc.PCConfig()
  boxes = jnp.array([
      [0, 0, 20, 20],     # 0: alone, s and c high, 25 cells: admitted
      [30, 0, 50, 20],    # 1: IoU 1/3 with 2
      [40, 0, 60, 20],    # 2
      [0, 30, 20, 50],    # 3: s = 0.5 (not > 0.5)
      [30, 30, 50, 50],   # 4: c = 0.4
      [0, 54, 12, 64],    # 5: 3 x 3 cells = 144 px <= 300
      [48, 30, 64, 52],   # 6: IoU 40/712 < 0.1 with 4: admitted
  ], jnp.float32)
  valid = jnp.ones((7,), bool)
  masks = boxinst.box_masks_at_stride(boxes, (16, 16), S)
  flags = jnp.array([0.9, 0.9, 0.9, 0.5, 0.9, 0.9, 0.9])
  scores = jnp.array([0.9, 0.9, 0.9, 0.9, 0.4, 0.9, 0.9])
  ious = np.asarray(box_ops.pairwise_iou(boxes, boxes))
  assert ious[1, 2] == pytest.approx(1 / 3)
  assert ious[4, 6] == pytest.approx(40 / 712)
  got = np.asarray(pc.admission(boxes, valid, masks, flags, scores, cfg))
  np.testing.assert_array_equal(got, [1, 0, 0, 0, 0, 0, 1])
  # An invalid (padding) GT overlapping 0 does not block it.
  got = pc.admission(boxes.at[1].set(boxes[0]), valid.at[1].set(False),
                     masks, flags, scores, cfg)
  assert bool(got[0])


def _entry(label_tuple, cfg):
  k = cfg.max_objects
  labels = np.full((k,), -1, np.int32)
  labels[:len(label_tuple)] = label_tuple
  hc, wc = cfg.crop
  return {
      "offset": jnp.zeros((2,), jnp.int32),
      "image": jnp.full((hc, wc, 3), len(label_tuple), jnp.uint8),
      "image_color": jnp.zeros((hc, wc, 3), jnp.uint8),
      "masks": jnp.zeros((k, hc // S, wc // S), bool),
      "labels": jnp.asarray(labels),
      "boxes": jnp.zeros((k, 4), jnp.float32),
      "scores": jnp.zeros((k,), jnp.float32),
      "object_valid": jnp.asarray(labels >= 0),
  }


def test_class_tuple_keys_capacity_and_random_eviction():
  cfg = pc.PCConfig(capacity=2, crop=(8, 8), max_objects=3)
  bank = _bank(cfg, [])
  key = jax.random.PRNGKey(0)
  bank, stored = pc.insert(bank, _entry((1, 2), cfg), jnp.bool_(True), key)
  assert bool(stored)
  # Same tuple: not stored, nothing replaced; another order is another key.
  _, stored = pc.insert(bank, _entry((1, 2), cfg), jnp.bool_(True), key)
  assert not bool(stored)
  bank, stored = pc.insert(bank, _entry((2, 1), cfg), jnp.bool_(True), key)
  assert bool(stored)
  np.testing.assert_array_equal(np.asarray(bank["labels"][:, :2]),
                                [[1, 2], [2, 1]])
  # Not offered (no admitted object): never stored.
  _, stored = pc.insert(bank, _entry((3,), cfg), jnp.bool_(False), key)
  assert not bool(stored)
  # Full: one of the 3 keys (2 stored + the new one) is deleted uniformly.
  keys = jax.random.split(jax.random.PRNGKey(1), 3000)
  out, stored = jax.vmap(lambda k: pc.insert(
      bank, _entry((3,), cfg), jnp.bool_(True), k))(keys)
  first = np.asarray(out["labels"][:, :, 0])
  frac_new_dropped = 1 - np.asarray(stored).mean()
  frac_slot0 = (first[:, 0] == 3).mean()
  frac_slot1 = (first[:, 1] == 3).mean()
  for frac in (frac_new_dropped, frac_slot0, frac_slot1):
    assert abs(frac - 1 / 3) < 0.04
  np.testing.assert_array_equal(np.asarray(out["valid"]).all(-1), True)
  # Where the new one was dropped, both old entries are intact.
  dropped = ~np.asarray(stored)
  np.testing.assert_array_equal(first[dropped], [[1, 2]] * dropped.sum())


def test_fit_in_crop_counts_objects_larger_than_the_crop():
  cfg = pc.PCConfig(crop=(16, 16), max_objects=2)
  boxes = jnp.array([[0, 0, 12, 12], [20, 20, 60, 30], [40, 0, 52, 8],
                     [40, 40, 48, 48]], jnp.float32)
  masks = boxinst.box_masks_at_stride(boxes, (16, 16), S)
  eligible = jnp.array([True, True, True, True])
  admitted, too_large, over, origin = pc.fit_in_crop(eligible, masks, cfg)
  # 0 fits (3 x 3 cells of 4 x 4); 1 is 10 cells wide (> 4); 2 does not
  # fit with 0 (cells 0..2 and 10..12); 3 fits alone but not with 0.
  np.testing.assert_array_equal(np.asarray(admitted), [1, 0, 0, 0])
  np.testing.assert_array_equal(np.asarray(too_large), [0, 1, 1, 1])
  np.testing.assert_array_equal(np.asarray(origin), [0, 0])
  # Capacity of an entry: a third fitting object is counted, not stored.
  boxes = jnp.array([[0, 0, 4, 4], [8, 0, 12, 4], [0, 8, 4, 12]],
                    jnp.float32)
  masks = boxinst.box_masks_at_stride(boxes, (16, 16), S)
  admitted, too_large, over, _ = pc.fit_in_crop(
      jnp.ones((3,), bool), masks, cfg)
  np.testing.assert_array_equal(np.asarray(admitted), [1, 1, 0])
  np.testing.assert_array_equal(np.asarray(over), [0, 0, 1])
  assert not np.asarray(too_large).any()


def test_instance_peer_shares_a_class_learner_has_its_class():
  cfg = pc.PCConfig(capacity=4, crop=(32, 32))
  cell = ((0, 4), (0, 4), [0, 0, 16, 16])
  bank = _bank(cfg, [
      ((0, 0), [cell + (7, 0.99)], 1),                 # class 7 only
      ((0, 0), [cell + (1, 0.6), cell + (2, 0.8)], 2),  # classes 1, 2
  ])
  keys = jax.random.split(jax.random.PRNGKey(0), 200)
  # Target with classes 2, 1, 1: the entry with classes (1, 2); its best
  # object of a class in the target is the class-2 one (0.8); the learner
  # is the only class-2 GT.
  labels = jnp.array([2, 1, 1, -1])
  valid = jnp.array([True, True, True, False])
  flags = jnp.zeros((4,))
  found, entry, sel, learner = jax.vmap(
      lambda k: pc.choose(bank, labels, valid, flags, k, cfg))(keys)
  # |bank| = 2 draws with replacement: both hit the class-7 entry (no
  # class in common) with probability 1/4, and then nothing is pasted.
  found = np.asarray(found)
  assert abs(found.mean() - 0.75) < 0.08
  assert (np.asarray(entry)[found] == 1).all()
  np.testing.assert_array_equal(np.asarray(sel)[found, :2],
                                [[0, 1]] * found.sum())
  assert (np.asarray(learner)[found] == 0).all()
  # Target with class 1 only: the class-1 object; a random class-1 GT.
  labels = jnp.array([3, 1, 1, -1])
  found, entry, sel, learner = jax.vmap(
      lambda k: pc.choose(bank, labels, valid, flags, k, cfg))(keys)
  found = np.asarray(found)
  np.testing.assert_array_equal(np.asarray(sel)[found, :2],
                                [[1, 0]] * found.sum())
  assert set(np.asarray(learner)[found].tolist()) == {1, 2}
  # lowest_s picks the class-1 GT of lowest score.
  low = pc.PCConfig(capacity=4, crop=(32, 32), learner="lowest_s")
  _, _, _, learner = pc.choose(bank, labels, valid,
                               jnp.array([0.1, 0.7, 0.4, 0.0]), keys[0], low)
  assert int(learner) == 2
  # No class in common: nothing found.
  found, _, _, _ = pc.choose(bank, jnp.array([5, 6, -1, -1]), valid, flags,
                             keys[0], cfg)
  assert not bool(found)


def test_pasted_box_overlaps_the_learner_by_the_configured_fraction():
  for ratio in (0.1, 0.3):
    cfg = pc.PCConfig(overlap_ratio=ratio)
    peer = jnp.array([3.0, 5.0, 43.0, 25.0])       # 40 x 20
    learner = jnp.array([60.0, 70.0, 160.0, 90.0])  # 100 x 20
    keys = jax.random.split(jax.random.PRNGKey(2), 2000)
    shift = np.asarray(jax.vmap(lambda k: pc.place(
        peer, learner, (jnp.int32(256), jnp.int32(256)), k, cfg))(keys))
    dy, dx = shift[:, 0], shift[:, 1]
    x0, x1 = 3 + dx, 43 + dx
    y0, y1 = 5 + dy, 25 + dy
    over_x = np.minimum(x1, 160) - np.maximum(x0, 60)
    over_y = np.minimum(y1, 90) - np.maximum(y0, 70)
    # At least ratio * peer size (up to the integer rounding of the shift).
    assert over_x.min() >= ratio * 40 - 0.5
    assert over_y.min() >= min(ratio * 20, 20) - 0.5
    # Both ends of the range are reached: x ~ U[X1 - (1 - r) w, X2 - r w].
    assert x0.min() <= 60 - (1 - ratio) * 40 + 1
    assert x0.max() >= 160 - ratio * 40 - 1
  # random placement keeps the peer box inside the image.
  cfg = pc.PCConfig(placement="random")
  shift = np.asarray(jax.vmap(lambda k: pc.place(
      peer, learner, (jnp.int32(100), jnp.int32(60)), k, cfg))(keys))
  assert (3 + shift[:, 1] >= 0).all() and (43 + shift[:, 1] <= 60).all()
  assert (5 + shift[:, 0] >= 0).all() and (25 + shift[:, 0] <= 100).all()


def _simple_cfg(**kw):
  return pc.PCConfig(type="simple", capacity=2, crop=(32, 32),
                     max_objects=2, **kw)


def test_occlusion_box_rederivation_and_drop_exactly():
  # min_area 200 px = 12.5 cells, so the 16-cell peer is pasted.
  cfg = _simple_cfg(min_area=200.0)
  # One bank object: mask cells rows 0..3, cols 0..3 = pixels [0, 16)^2,
  # pasted at its source position (simple): U = [0, 16) x [0, 16).
  bank = _bank(cfg, [((0, 0), [((0, 4), (0, 4), [0, 0, 16, 16], 1, 0.9)],
                      200)])
  ex = _example(
      [[8, 0, 24, 12],      # 0: rect rows 0..12 cols 8..24 -> [16,0,25,13]
       [0, 0, 12, 12],      # 1: wholly covered -> dropped
       [2, 40, 30, 50],     # 2: untouched -> quantised [2, 40, 31, 51]
       [0, 4, 28, 14],      # 3: -> [16, 4, 29, 15], moved 16, 9 cells left
       [0, 0, 60, 15.5]],   # 4: -> [16, 0, 61, 16], moved 16, 44 cells left
      [2, 2, 3, 3, 3], [0.3, 0.4, 0.5, 0.6, 0.7], [0.0] * 5)
  new_bank, out, m = paste_one(bank, ex, jax.random.PRNGKey(0), 0, cfg=cfg)
  assert float(m["pc_pasted"]) == 1.0
  np.testing.assert_array_equal(np.asarray(out["instance_valid"]),
                                [1, 0, 1, 0, 1, 0, 1, 0])
  got = np.asarray(out["boxes"])
  np.testing.assert_array_equal(got[[0, 2, 4]], [[16, 0, 25, 13],
                                                 [2, 40, 31, 51],
                                                 [16, 0, 61, 16]])
  np.testing.assert_array_equal(got[[1, 3, 5]], 0)
  # The peer is appended (after the N = 6 target rows): its mask box,
  # class, stored mask and score.
  np.testing.assert_array_equal(got[6], [0, 0, 16, 16])
  assert int(out["labels"][6]) == 1
  assert float(out["pseudo_flags"][6]) == pytest.approx(0.9)
  peer_mask = np.zeros((16, 16))
  peer_mask[:4, :4] = 1
  np.testing.assert_array_equal(np.asarray(out["pseudo_masks"][6]),
                                peer_mask)
  np.testing.assert_array_equal(np.asarray(out["labels"])[:6],
                                [2, -1, 3, -1, 3, -1])
  np.testing.assert_allclose(np.asarray(out["pseudo_flags"])[:6],
                             [0.3, 0, 0.5, 0, 0.7, 0])
  # Occluded pseudo masks: the covered cells removed, the rest kept.
  before = np.asarray(ex["pseudo_masks"])
  after = np.asarray(out["pseudo_masks"])
  np.testing.assert_array_equal(after[4], before[4] * (1 - peer_mask))
  np.testing.assert_array_equal(after[2], before[2])
  assert after[1].sum() == 0 and after[3].sum() == 0
  assert float(m["pc_targets_dropped"]) == 2.0
  # Pixels: the peer's in U, the target's elsewhere; the colour view gets
  # the geometric-view pixels of the peer.
  img = np.asarray(out["image"][..., 0])
  assert (img[:16, :16] == 200).all() and (img[16:, :] == 10).all()
  assert (img[:16, 16:] == 10).all()
  col = np.asarray(out["image_teacher"][..., 0])
  assert (col[:16, :16] == 201).all() and (col[16:, :] == 11).all()
  # Used once: the entry left the bank (the image itself had nothing
  # admissible: box scores 0).
  assert not np.asarray(new_bank["valid"]).any()
  _, out2, m2 = paste_one(new_bank, ex, jax.random.PRNGKey(1), 0, cfg=cfg)
  assert float(m2["pc_pasted"]) == 0.0
  # color_view="unpasted" (the code) leaves the colour image alone.
  _, out3, _ = paste_one(bank, ex, jax.random.PRNGKey(0), 0,
                         cfg=_simple_cfg(min_area=200.0,
                                         color_view="unpasted"))
  np.testing.assert_array_equal(np.asarray(out3["image_teacher"]),
                                np.asarray(ex["image_teacher"]))
  np.testing.assert_array_equal(np.asarray(out3["image"]),
                                np.asarray(out["image"]))


def test_empty_bank_pastes_nothing_and_shapes_hold():
  cfg = pc.PCConfig(capacity=3, crop=(32, 32))
  bank = _bank(cfg, [])
  ex = _example([[8, 0, 24, 12], [30, 30, 50, 50]], [2, 2], [0.3, 0.4],
                [0.0, 0.0])
  _, out, m = paste_one(bank, ex, jax.random.PRNGKey(0), 0, cfg=cfg)
  assert float(m["pc_attempted"]) == 1.0 and float(m["pc_pasted"]) == 0.0
  for k in ("image", "image_teacher"):
    np.testing.assert_array_equal(np.asarray(out[k]), np.asarray(ex[k]))
  for k in ("boxes", "labels", "instance_valid", "pseudo_masks",
            "pseudo_flags"):
    assert out[k].shape == (7,) + ex[k].shape[1:], k
    np.testing.assert_array_equal(np.asarray(out[k][:6]),
                                  np.asarray(ex[k]), err_msg=k)
  assert not bool(out["instance_valid"][6])


def test_nothing_pasted_outside_the_canvas_or_into_padding():
  cfg = _simple_cfg()
  # The source object sits at pixels [32, 64)^2 of its canvas; the target
  # image is 52 x 56 (rows 52.., columns 56.. are padding).
  bank = _bank(cfg, [((32, 32), [((0, 8), (0, 8), [32, 32, 64, 64], 1,
                                  0.9)], 200)])
  ex = _example([[0, 0, 20, 20]], [1], [0.5], [0.0], valid_hw=(52, 56))
  _, out, m = paste_one(bank, ex, jax.random.PRNGKey(0), 0, cfg=cfg)
  assert float(m["pc_pasted"]) == 1.0  # 5 x 6 cells = 480 px left
  img = np.asarray(out["image"][..., 0])
  assert (img[52:] == 0).all() and (img[:, 56:] == 0).all()
  assert (img[32:52, 32:56] == 200).all()
  assert (img[:32, :56] == 10).all() and (img[:52, :32] == 10).all()
  np.testing.assert_array_equal(np.asarray(out["boxes"][6]),
                                [32, 32, 56, 52])
  grid = np.asarray(out["pseudo_masks"][6])
  assert grid.sum() == 5 * 6 and grid[8:13, 8:14].all()
  # A shift past the canvas edges: crop cells map into the canvas only.
  crop = jnp.ones((1, 8, 8), bool)
  valid = jnp.ones((64, 64), bool)
  for origin in ((-20, -12), (50, 56)):
    g = np.asarray(pc.shifted_masks(crop, jnp.array(origin), valid, S))[0]
    u, _, _ = pc.full_mask(crop[0], jnp.array(origin), valid, S)
    u = np.asarray(u)
    ys, xs = np.nonzero(u)
    assert ys.min() == max(origin[0], 0) and ys.max() == min(
        origin[0] + 32, 64) - 1
    assert xs.min() == max(origin[1], 0) and xs.max() == min(
        origin[1] + 32, 64) - 1
    # The grid mask is U at the sample points.
    np.testing.assert_array_equal(g, u[2::4, 2::4])
    box = np.asarray(pc.shifted_boxes(crop, jnp.array(origin),
                                      (jnp.int32(64), jnp.int32(64)), S))[0]
    np.testing.assert_array_equal(box, [xs.min(), ys.min(), xs.max() + 1,
                                        ys.max() + 1])


SHARDED_SCRIPT = r"""
import json, sys
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
sys.path.insert(0, "tests/methods")
import test_pc as t
from boxseg_jax.methods import pc

assert len(jax.devices()) == 4, jax.devices()
cfg = pc.PCConfig(capacity=3, crop=(32, 32), max_objects=2, ramp_steps=2)
rng = np.random.default_rng(0)

def batch(num):
  exs = []
  for _ in range(num):
    n = int(rng.integers(1, 4))
    xy = rng.integers(0, 40, (n, 2))
    wh = rng.integers(10, 24, (n, 2))
    boxes = np.concatenate([xy, np.minimum(xy + wh, 64)], 1)
    ex = t._example(boxes, rng.integers(0, 2, n), rng.uniform(0.3, 1, n),
                    np.full(n, 0.9), value=int(rng.integers(1, 250)))
    exs.append(ex)
  out = {k: jnp.stack([e[k] for e in exs]) for k in exs[0]}
  out["image"] = jnp.asarray(rng.integers(0, 255, out["image"].shape),
                             jnp.uint8)
  return out

batches = [batch(8) for _ in range(4)]
bank0 = pc.init_bank(cfg, 4, jax.random.PRNGKey(3))
mesh = Mesh(jax.devices(), ("data",))
data, rep = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
fn = jax.jit(lambda b, x, s: pc.apply(b, x, s, cfg),
             in_shardings=(data, data, rep), out_shardings=(data, data, rep))
bank = jax.device_put(bank0, data)
outs, pasted = [], 0.0
for step, b in enumerate(batches):
  bank, out, m = fn(bank, jax.device_put(b, data), jnp.int32(step))
  outs.append(out)
  pasted += float(m["pc_pasted"])
assert len(bank["image"].sharding.device_set) == 4
one = jax.jit(lambda b, x, s: pc.apply(b, x, s, cfg))
diffs = []
for d in range(4):
  bank_d = jax.tree.map(lambda x: x[d:d + 1], bank0)
  for step, b in enumerate(batches):
    part = jax.tree.map(lambda x: x[2 * d:2 * d + 2], b)
    bank_d, out_d, _ = one(bank_d, part, jnp.int32(step))
    for k, v in out_d.items():
      if not np.array_equal(np.asarray(v), np.asarray(
          outs[step][k][2 * d:2 * d + 2])):
        diffs.append(f"out {k} device {d} step {step}")
  for k, v in bank_d.items():
    if not np.array_equal(np.asarray(v), np.asarray(bank[k][d:d + 1])):
      diffs.append(f"bank {k} device {d}")
sizes = np.asarray(bank["valid"]).sum(-1).tolist()
print("RESULT " + json.dumps({"diffs": diffs, "pasted": pasted,
                              "sizes": sizes}))
"""


def test_four_device_banks_equal_four_one_device_runs():
  # Imported here: SHARDED_SCRIPT imports this module from tests/methods/.
  import forced_devices  # pylint: disable=g-import-not-at-top
  res = forced_devices.run(SHARDED_SCRIPT)
  assert res["diffs"] == []
  # Not vacuous: the banks filled and images were pasted.
  assert res["pasted"] > 0 and sum(res["sizes"]) > 0
