"""CutLER's DropLoss and copy-paste (methods/cutler.py), by hand, and the
`cutler` train step with both on: one compilation, pastes happen."""

import jax
import jax.numpy as jnp
import numpy as np

from boxseg_jax import config_helpers
from boxseg_jax.losses import fcos
from boxseg_jax.methods import cutler
from boxseg_jax.train import loop
from boxseg_jax.train import models
from boxseg_jax.train import optim
from boxseg_jax.train import step as step_lib


# ------------------------------------------------------------------ DropLoss


def _focal(z, t, alpha=0.25, gamma=2.0):
  """fvcore's sigmoid focal loss, written out for one logit."""
  p = 1.0 / (1.0 + np.exp(-z))
  ce = -(t * np.log(p) + (1 - t) * np.log(1 - p))
  p_t = p * t + (1 - p) * (1 - t)
  a_t = alpha * t + (1 - alpha) * (1 - t)
  return a_t * ce * (1 - p_t) ** gamma


def test_droploss_weights_three_locations_by_hand():
  # One GT box [0, 0, 16, 16]; three stride-8 locations.
  points = jnp.array([[4.0, 4.0], [12.0, 12.0], [60.0, 60.0]])
  strides = jnp.array([8.0, 8.0, 8.0])
  reg = jnp.array([[
      [0.0, 0.0, 0.0, 0.0],   # positive, zero-size box: IoU 0, kept
      [0.5, 0.5, 0.5, 0.5],   # negative, box [8,8,16,16]: IoU 0.25, kept
      [0.5, 0.5, 0.5, 0.5],   # negative, box [56,56,64,64]: IoU 0, dropped
  ]])
  boxes = jnp.array([[[0.0, 0.0, 16.0, 16.0], [0.0, 0.0, 64.0, 64.0]]])
  valid = jnp.array([[True, False]])   # the second box is padding
  positive = jnp.array([[True, False, False]])
  w = cutler.droploss_weights(reg, points, strides, boxes, valid, positive,
                              iou_thresh=0.01)
  np.testing.assert_array_equal(np.asarray(w), [[1.0, 1.0, 0.0]])
  # 0.25 > 0.01 but not > 0.3: the threshold is the rule.
  w = cutler.droploss_weights(reg, points, strides, boxes, valid, positive,
                              iou_thresh=0.3)
  np.testing.assert_array_equal(np.asarray(w), [[1.0, 0.0, 0.0]])

  # In the focal loss: weighted sum, normaliser = the one positive.
  logits = np.array([0.3, -1.0, 2.0], np.float32)
  outputs = {'cls_logits': jnp.asarray(logits)[None, :, None],
             'reg': reg + 1.0, 'ctrness': jnp.zeros((1, 3))}
  targets = {'labels': jnp.array([[0, 1, 1]]),
             'reg_targets': jnp.ones((1, 3, 4)),
             'ctrness': jnp.array([[1.0, 0.0, 0.0]]),
             'positive': positive}
  w = cutler.droploss_weights(reg, points, strides, boxes, valid, positive)
  out = fcos.fcos_losses(outputs, targets, cls_location_weight=w)
  plain = fcos.fcos_losses(outputs, targets)
  f = [_focal(logits[0], 1.0), _focal(logits[1], 0.0),
       _focal(logits[2], 0.0)]
  np.testing.assert_allclose(float(out['loss_fcos_cls']), f[0] + f[1],
                             rtol=1e-5)
  np.testing.assert_allclose(float(plain['loss_fcos_cls']), sum(f),
                             rtol=1e-5)
  assert float(out['num_pos']) == 1.0
  # Box and quality losses do not change.
  for k in ('loss_fcos_loc', 'loss_fcos_ctr'):
    assert float(out[k]) == float(plain[k])


def test_droploss_weights_have_no_gradient():
  points = jnp.array([[4.0, 4.0]])
  boxes = jnp.array([[[0.0, 0.0, 16.0, 16.0]]])
  fn = lambda r: cutler.droploss_weights(
      r, points, jnp.array([8.0]), boxes, jnp.array([[True]]),
      jnp.array([[False]])).sum()
  g = jax.grad(fn)(jnp.full((1, 1, 4), 0.5))
  assert not np.asarray(g).any()


# ---------------------------------------------------------------- copy-paste

S = 4
# One compilation per settings (eager op-by-op execution is far slower).
_paste = jax.jit(cutler.paste_one, static_argnums=3)


def _grid(cells):
  """[8, 8] bool grid mask from (row slice, col slice)."""
  m = np.zeros((8, 8), bool)
  m[cells] = True
  return m


def _example(masks, boxes, value, num_rows=8):
  n = len(masks)
  m = np.zeros((num_rows, 8, 8), bool)
  b = np.zeros((num_rows, 4), np.float32)
  if n:
    m[:n] = masks
    b[:n] = boxes
  return {
      'image': jnp.full((32, 32, 3), value, jnp.uint8),
      'image_teacher': jnp.full((32, 32, 3), value + 1, jnp.uint8),
      'image_valid': jnp.ones((32, 32), bool),
      'boxes': jnp.asarray(b),
      'labels': jnp.asarray(np.where(np.arange(num_rows) < n, 0, -1),
                            jnp.int32),
      'instance_valid': jnp.asarray(np.arange(num_rows) < n),
      'example_valid': jnp.asarray(True),
      'masks': jnp.asarray(m),
  }


def test_copy_paste_occlusion_removal_and_boxes_by_hand():
  # Ratio 1 and a full-size donor: the resize is the identity, offset 0.
  cfg = cutler.CopyPasteConfig(random_num=False, min_ratio=1.0,
                               max_ratio=1.0)
  a = _grid((slice(0, 4), slice(0, 4)))          # box [0, 0, 16, 16]
  b = _grid((slice(5, 8), slice(5, 7)))          # box [20, 20, 28, 32]
  target = _example([a, b], [[0, 0, 16, 16], [20, 20, 28, 32]], 10)
  c1 = _grid((slice(5, 6), slice(4, 8)))         # 2 of b's 6 cells each
  c2 = _grid((slice(6, 7), slice(4, 8)))
  c3 = _grid((slice(7, 8), slice(4, 8)))
  c4 = _grid((slice(3, 5), slice(0, 4)))         # a's last row: ioy 4/16
  donor = _example([c1, c2, c3, c4],
                   [[16, 20, 32, 24], [16, 24, 32, 28], [16, 28, 32, 32],
                    [0, 12, 16, 20]], 200)
  out, m = _paste(target, donor, jax.random.PRNGKey(0), cfg)
  valid = np.asarray(out['instance_valid'])
  masks = np.asarray(out['masks'])
  boxes = np.asarray(out['boxes'])
  assert float(m['cp_pasted']) == 1 and float(m['cp_copies']) == 4
  assert float(m['cp_targets_removed']) == 1
  # a: occluded by c4's rows, box recomputed from what is left.
  np.testing.assert_array_equal(masks[0], _grid((slice(0, 3), slice(0, 4))))
  np.testing.assert_array_equal(boxes[0], [0, 0, 16, 12])
  # b: covered by the union of c1..c3 (each ioy 1/3 < 0.5), removed.
  assert not valid[1] and not masks[1].any() and not boxes[1].any()
  assert int(out['labels'][1]) == -1
  # The copies fill the rows free before the paste, in donor order.
  np.testing.assert_array_equal(valid, [1, 0, 1, 1, 1, 1, 0, 0])
  for row, (c, box) in zip((2, 3, 4, 5), zip(
      (c1, c2, c3, c4), ([16, 20, 32, 24], [16, 24, 32, 28],
                         [16, 28, 32, 32], [0, 12, 16, 20]))):
    np.testing.assert_array_equal(masks[row], c)
    np.testing.assert_array_equal(boxes[row], box)
  # Donor pixels under the block-upsampled union of the copies, both views.
  union = np.kron(c1 | c2 | c3 | c4, np.ones((S, S), bool))
  img = np.asarray(out['image'][..., 0])
  np.testing.assert_array_equal(img, np.where(union, 200, 10))
  np.testing.assert_array_equal(np.asarray(out['image_teacher'][..., 0]),
                                np.where(union, 201, 11))


def test_copy_paste_ioy_rule_and_empty_target():
  cfg = cutler.CopyPasteConfig(random_num=False, min_ratio=1.0,
                               max_ratio=1.0)
  a = _grid((slice(0, 4), slice(0, 4)))
  target = _example([a], [[0, 0, 16, 16]], 10)
  # Covers half of a: ioy 0.5 is not < 0.5, nothing is pasted.
  donor = _example([_grid((slice(2, 6), slice(0, 4)))], [[0, 8, 16, 24]],
                   200)
  out, m = _paste(target, donor, jax.random.PRNGKey(1), cfg)
  assert float(m['cp_pasted']) == 0 and float(m['cp_rejected_ioy']) == 1
  for k in ('image', 'boxes', 'masks', 'instance_valid'):
    np.testing.assert_array_equal(np.asarray(out[k]), np.asarray(target[k]))
  # A target without objects takes the copy as its only object.
  empty = _example([], [], 10)
  out, m = _paste(empty, donor, jax.random.PRNGKey(1), cfg)
  assert float(m['cp_pasted']) == 1
  np.testing.assert_array_equal(np.asarray(out['instance_valid'])[:2],
                                [True, False])
  np.testing.assert_array_equal(np.asarray(out['boxes'][0]), [0, 8, 16, 24])
  # The reference's bug in that branch: x and y offsets swapped.
  quirk = cutler.CopyPasteConfig(random_num=False, min_ratio=0.5,
                                 max_ratio=0.5, swap_xy_quirk=True)
  fixed = cutler.CopyPasteConfig(random_num=False, min_ratio=0.5,
                                 max_ratio=0.5)
  key = _aligned_key(empty, donor, fixed)
  bq = np.asarray(_paste(empty, donor, key, quirk)[0]['boxes'][0])
  bf = np.asarray(_paste(empty, donor, key, fixed)[0]['boxes'][0])
  # Half size: the donor box [0, 8, 16, 24] -> [0, 4, 8, 12] + offset.
  dx, dy = bf[0], bf[1] - 4
  np.testing.assert_array_equal(bf, [dx, 4 + dy, 8 + dx, 12 + dy])
  np.testing.assert_array_equal(bq, [dy, 4 + dx, 8 + dy, 12 + dx])


def _aligned_key(target, donor, cfg):
  """A key whose offset lies on the stride-4 grid (so the copy's grid box
  is its moved donor box exactly, not clipped to the grid's blocks)."""
  for i in range(100):
    key = jax.random.PRNGKey(i)
    box = np.asarray(_paste(target, donor, key, cfg)[0]['boxes'])
    if not (box[0] % S).any() and box[0, 2] > 0:
      return key
  raise AssertionError('no grid-aligned offset in 100 keys')


def test_copy_paste_resize_and_number_of_copies():
  # Ratio 0.5: a 16 x 16 donor block lands as an 8 x 8 block at the offset.
  cfg = cutler.CopyPasteConfig(random_num=False, min_ratio=0.5,
                               max_ratio=0.5)
  donor = _example([_grid((slice(0, 4), slice(0, 4)))], [[0, 0, 16, 16]],
                   200)
  donor['image'] = donor['image'].at[:16, :16].set(50)
  empty = _example([], [], 10)
  out, _ = _paste(empty, donor, _aligned_key(empty, donor, cfg),
                            cfg)
  box = np.asarray(out['boxes'][0])
  assert box[2] - box[0] == 8 and box[3] - box[1] == 8
  mask = np.asarray(out['masks'][0])
  assert mask.sum() == 4
  img = np.asarray(out['image'][..., 0])
  x0, y0 = int(box[0]), int(box[1])
  assert (img[y0:y0 + 8, x0:x0 + 8] == 50).all()
  assert (img == 50).sum() == 64 and (img == 10).sum() == 32 * 32 - 64
  # num_copy: 1 for one object, otherwise uniform in [1, n - 1].
  keys = jax.random.split(jax.random.PRNGKey(0), 200)
  draws = np.asarray(jax.vmap(lambda k: cutler.num_copies(
      k, jnp.int32(4), True))(keys))
  assert set(draws.tolist()) == {1, 2, 3}
  assert int(cutler.num_copies(keys[0], jnp.int32(1), True)) == 1
  assert int(cutler.num_copies(keys[0], jnp.int32(4), False)) == 4


def test_donors_are_the_batch_reversed_per_device():
  x = jnp.arange(8)
  np.testing.assert_array_equal(
      np.asarray(cutler.reversed_per_device(x, 2)), [3, 2, 1, 0, 7, 6, 5, 4])
  np.testing.assert_array_equal(
      np.asarray(cutler.reversed_per_device(x, 1)), np.arange(8)[::-1])


# ---------------------------------------------------------------- the step


def _synthetic_batch(c, rng):
  """A batch of the pipeline's shapes and dtypes for config ``c``, with
  1-3 rectangles per image (masks on the stride-4 grid)."""
  b, n = c.data.batch_size, c.data.max_instances
  h, w = c.data.canvas
  masks = np.zeros((b, n, h // S, w // S), bool)
  boxes = np.zeros((b, n, 4), np.float32)
  valid = np.zeros((b, n), bool)
  for i in range(b):
    for j in range(1 + i % 3):
      y0, x0 = rng.integers(0, h // S - 6, 2)
      hh, ww = rng.integers(3, 6, 2)
      masks[i, j, y0:y0 + hh, x0:x0 + ww] = True
      boxes[i, j] = [S * x0, S * y0, S * (x0 + ww), S * (y0 + hh)]
      valid[i, j] = True
  image = rng.integers(0, 255, (b, h, w, 3), np.uint8)
  return {'image': image, 'image_teacher': image.copy(),
          'image_valid': np.ones((b, h, w), bool), 'boxes': boxes,
          'labels': np.where(valid, 0, -1).astype(np.int32),
          'instance_valid': valid, 'example_valid': np.ones((b,), bool),
          'scale': np.ones((b, 2), np.float32), 'masks': masks}


def test_cutler_step_compiles_once_with_copy_paste_and_droploss():
  # The demo chain test's config (tests/test_self_train.py): the two share
  # the compiled step through the persistent XLA cache.
  c = config_helpers.load_config_file('demo_cutler', 'tiny')
  model = models.build_model(c)
  mesh = step_lib.make_mesh(c.train.num_devices)
  abstract = jax.eval_shape(lambda: model.init(
      jax.random.PRNGKey(0), jnp.zeros((1,) + tuple(c.data.canvas) + (3,)),
      train=False))
  tx, schedule = optim.make_optimizer(
      c.optim, models.trainable_mask(c, abstract['params']))
  state = loop.init_state(c, model, tx, mesh)
  traces = [0]
  raw = step_lib.make_train_step(model, tx, schedule, c)

  def counted_step(s, b):
    traces[0] += 1
    return raw(s, b)

  step_fn = step_lib.jit_train_step(counted_step, mesh)
  _, sharding = step_lib.shardings(mesh)
  rng = np.random.default_rng(0)
  pasted = 0.0
  for _ in range(2):
    state, metrics = step_fn(state, loop.global_batch(
        _synthetic_batch(c, rng), sharding))
    assert float(metrics['update_skipped']) == 0
    assert float(metrics['loss_mask']) > 0
    # DropLoss dropped some negatives, kept the positives.
    assert 0 < float(metrics['droploss_kept']) < 1
    pasted += float(metrics['cp_pasted'])
    assert float(metrics['cp_copies']) > 0
  assert traces[0] == 1
  assert pasted > 0
  assert int(state.step) == 2
