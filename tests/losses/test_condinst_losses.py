"""Tests for boxseg_jax.losses.condinst: instance selection, full loss."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from boxseg_jax import targets as targets_lib
from boxseg_jax.losses import condinst
from boxseg_jax.losses import mask_terms
from boxseg_jax.ops import dynamic_mask_head as dmh
from boxseg_jax.ops.locations import fcos_locations

H, W, N, C, B = 64, 96, 4, 3, 2


def _select_reference(positive, gt, scores, k):
  """Reference §2.4 loop: per GT its top max(int(k / U), 1) positives."""
  pos = np.nonzero(positive)[0]
  if not len(pos):
    return set()
  uniq = np.unique(gt[pos])
  quota = max(int(k / len(uniq)), 1)
  kept = set()
  for g in uniq:
    locs = pos[gt[pos] == g]
    if len(locs) > quota:
      locs = locs[np.argsort(-scores[locs], kind='stable')[:quota]]
    kept |= set(locs.tolist())
  return kept


def _select(positive, gt, scores, **kw):
  idx, valid = jax.jit(functools.partial(condinst.select_topk_per_gt, **kw))(
      jnp.asarray(positive), jnp.asarray(gt), jnp.asarray(scores))
  idx, valid = np.asarray(idx), np.asarray(valid)
  return idx, valid, set(idx[valid].tolist())


def test_select_hand_case():
  positive = np.array([1, 1, 1, 1, 0, 1, 1, 0, 0, 0], bool)
  gt = np.array([0, 0, 0, 0, 1, 2, 2, -1, -1, -1])
  scores = np.array([.1, .9, .5, .5, .99, .3, .2, .8, .8, .8], np.float32)
  # U = 2 (GTs 0 and 2; GT 1's location is not positive): quota int(4/2) = 2.
  # GT 0 keeps loc 1 (.9) and loc 2 (.5, ties with loc 3: lower index first);
  # GT 2 keeps locs 5, 6.
  idx, valid, kept = _select(positive, gt, scores, num_gt=3,
                             topk_per_image=4, num_slots=6)
  assert kept == {1, 2, 5, 6}
  assert valid.sum() == 4 and len(idx) == 6
  # topk 5 -> int(5 / 2) = 2 as well; topk 64 -> 32 per GT: everything.
  assert _select(positive, gt, scores, num_gt=3, topk_per_image=5,
                 num_slots=6)[2] == {1, 2, 5, 6}
  assert _select(positive, gt, scores, num_gt=3, topk_per_image=64,
                 num_slots=8)[2] == {0, 1, 2, 3, 5, 6}


def test_select_more_gts_than_slots():
  # 3 GTs with one positive each, k = 2: quota max(int(2/3), 1) = 1, so the
  # reference keeps 3 > 2 slots; we keep the two best-scored.
  positive = np.array([1, 1, 1, 0], bool)
  gt = np.array([0, 1, 2, 0])
  scores = np.array([.2, .7, .5, .9], np.float32)
  _, valid, kept = _select(positive, gt, scores, num_gt=3, topk_per_image=2)
  assert kept == {1, 2} and valid.all()


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_select_matches_reference_loop(seed):
  rng = np.random.default_rng(seed)
  num_loc, num_gt = 300, 9
  positive = rng.uniform(size=num_loc) < 0.3
  gt = np.where(positive, rng.integers(0, 4 + seed, num_loc), -1)
  scores = rng.uniform(size=num_loc).astype(np.float32)
  _, valid, kept = _select(positive, gt, scores, num_gt=num_gt,
                           topk_per_image=16)
  assert kept == _select_reference(positive, gt, scores, 16)
  assert valid.sum() == len(kept)
  # No positives: every slot invalid.
  _, valid, kept = _select(np.zeros(num_loc, bool), gt, scores,
                           num_gt=num_gt, topk_per_image=16)
  assert not valid.any() and kept == set()


def test_select_random():
  positive = np.zeros(50, bool)
  positive[[3, 7, 11]] = True
  idx, valid = condinst.select_random(jnp.asarray(positive),
                                      jax.random.PRNGKey(0), num_slots=5)
  assert set(np.asarray(idx)[np.asarray(valid)].tolist()) == {3, 7, 11}


def _random_problem(seed=0, with_masks=False):
  rng = np.random.default_rng(seed)
  num_loc = fcos_locations(H, W).points.shape[0]
  k = jax.random.split(jax.random.PRNGKey(seed), 6)
  outputs = {
      'cls_logits': jax.random.normal(k[0], (B, num_loc, C)),
      'reg': jax.nn.relu(jax.random.normal(k[1], (B, num_loc, 4))) * 2,
      'ctrness': jax.random.normal(k[2], (B, num_loc)),
      'controller': 0.3 * jax.random.normal(k[3], (B, num_loc, 233)),
      'mask_feats': jax.random.normal(k[4], (B, H // 8, W // 8, 16)),
  }
  boxes = np.array([[[4.5, 6.2, 40.7, 33.1], [20., 10., 70.3, 55.9],
                     [60., 2., 90., 40.], [0., 0., 0., 0.]],
                    [[10., 10., 50., 50.], [0., 30., 30., 62.],
                     [0., 0., 0., 0.], [0., 0., 0., 0.]]], np.float32)
  image_valid = np.zeros((B, H, W), bool)
  image_valid[0, :60, :] = True
  image_valid[1, :, :80] = True
  image = rng.integers(0, 256, (B, H, W, 3)).astype(np.uint8)
  batch = {
      'image_valid': jnp.asarray(image_valid),
      'image_teacher': jnp.asarray(image),
      'boxes': jnp.asarray(boxes),
      'labels': jnp.array([[0, 1, 2, -1], [2, 0, -1, -1]], jnp.int32),
      'instance_valid': jnp.array([[1, 1, 1, 0], [1, 1, 0, 0]], bool),
      'example_valid': jnp.ones((B,), bool),
  }
  if with_masks:
    masks = np.zeros((B, N, H, W), bool)
    for b in range(B):
      for j in range(N):
        x0, y0, x1, y1 = boxes[b, j].astype(int)
        masks[b, j, y0:y1, x0:(x0 + x1) // 2 + 1] = j < 3 - b
    batch['masks'] = jnp.asarray(masks)
  return outputs, batch


def _targets(batch):
  locs = fcos_locations(H, W)
  return targets_lib.batch_fcos_targets(
      jnp.asarray(locs.points), jnp.asarray(locs.levels),
      jnp.asarray(locs.strides), batch['boxes'], batch['labels'],
      batch['instance_valid'], num_classes=C)


@pytest.mark.parametrize('mode', ['boxinst', 'mask'])
def test_gradients_finite(mode):
  outputs, batch = _random_problem(0, with_masks=mode == 'mask')
  fn = jax.jit(lambda o: condinst.condinst_losses(
      o, None, batch, mode=mode, step=10, topk_proposals_per_im=8))
  (total, aux), grads = jax.value_and_grad(fn, has_aux=True)(outputs)
  assert np.isfinite(float(total))
  for g in jax.tree.leaves(grads):
    assert np.isfinite(np.asarray(g)).all()
  assert float(jnp.abs(grads['controller']).sum()) > 0
  assert float(jnp.abs(grads['mask_feats']).sum()) > 0
  names = {'boxinst': 'loss_prj', 'mask': 'loss_mask'}
  assert float(aux[names[mode]]) > 0
  parts = sum(float(v) for k, v in aux.items() if k.startswith('loss_'))
  assert float(total) == pytest.approx(parts, rel=1e-6)
  for v in aux.values():
    assert v.dtype == jnp.float32 and v.shape == ()


def _manual_slots(outputs, targets, k):
  """Selected (image, location) pairs from the numpy reference loop."""
  score = np.asarray(jax.nn.sigmoid(outputs['cls_logits'].max(-1)) *
                     jax.nn.sigmoid(outputs['ctrness']))
  slots = []
  for b in range(B):
    kept = _select_reference(np.asarray(targets['positive'][b]),
                             np.asarray(targets['gt_index'][b]), score[b], k)
    slots += [(b, i) for i in sorted(kept)]
  return slots


def _manual_logits(outputs, slots):
  locs = fcos_locations(H, W)
  head = jax.jit(dmh.dynamic_mask_logits)
  out = []
  for b, i in slots:
    soi = [64, 128, 256, 512, 1024][locs.levels[i]]
    out.append(head(
        outputs['mask_feats'][b], outputs['controller'][b, i][None],
        jnp.asarray(locs.points[i])[None], jnp.array([soi], jnp.float32))[0])
  return np.asarray(jnp.stack(out), np.float64)


def _dice_np(x, t):
  return 1 - 2 * (x * t).sum() / ((x * x).sum() + (t * t).sum() + 1e-5)


def _manual_projection(outputs, batch, targets, slots):
  """Mean projection loss over `slots` (numpy, from the formula)."""
  probs = 1 / (1 + np.exp(-_manual_logits(outputs, slots)))
  losses = []
  for (b, i), p in zip(slots, probs):
    g = int(targets['gt_index'][b, i])
    x0, y0, x1, y1 = np.asarray(batch['boxes'][b, g])
    full = np.zeros((H, W))
    full[int(y0):int(y1 + 1), int(x0):int(x1 + 1)] = 1
    m = full[2::4, 2::4]
    losses.append(_dice_np(p.max(0), m.max(0)) + _dice_np(p.max(1), m.max(1)))
  return np.mean(losses)


def test_projection_and_selection_glue_match_manual():
  outputs, batch = _random_problem(1)
  targets = _targets(batch)
  k = 8
  _, aux = jax.jit(lambda o: condinst.condinst_losses(
      o, targets, batch, topk_proposals_per_im=k))(outputs)
  slots = _manual_slots(outputs, targets, k)
  assert float(aux['num_mask_instances']) == len(slots) > 4
  assert float(aux['num_pos']) == float(targets['positive'].sum())
  np.testing.assert_allclose(float(aux['loss_prj']),
                             _manual_projection(outputs, batch, targets,
                                                slots), rtol=1e-4)


def test_smaller_slot_budget_keeps_best_and_counts_overflow():
  outputs, batch = _random_problem(1)
  targets = _targets(batch)
  k = 8
  full = _manual_slots(outputs, targets, k)
  fn = lambda o, s: condinst.condinst_losses(
      o, targets, batch, topk_proposals_per_im=k, num_slots=s)[1]
  assert float(jax.jit(lambda o: fn(o, None))(outputs)[
      'mask_slots_overflow']) == 0
  slots = 3
  aux = jax.jit(lambda o: fn(o, slots))(outputs)
  per_image = [sum(1 for b, _ in full if b == i) for i in range(B)]
  expect_kept = sum(min(n, slots) for n in per_image)
  assert max(per_image) > slots  # the case is not vacuous
  assert float(aux['num_mask_instances']) == expect_kept
  assert float(aux['mask_slots_overflow']) == len(full) - expect_kept
  # The kept ones are each image's highest-scored of the reference's set:
  # the projection loss equals the manual mean over exactly those.
  score = np.asarray(jax.nn.sigmoid(outputs['cls_logits'].max(-1)) *
                     jax.nn.sigmoid(outputs['ctrness']))
  best = []
  for i in range(B):
    mine = sorted([s for s in full if s[0] == i], key=lambda s: -score[s])
    best += mine[:slots]
  np.testing.assert_allclose(float(aux['loss_prj']),
                             _manual_projection(outputs, batch, targets,
                                                best), rtol=1e-4)


def test_mask_mode_dice_matches_manual():
  outputs, batch = _random_problem(2, with_masks=True)
  targets = _targets(batch)
  _, aux = jax.jit(lambda o: condinst.condinst_losses(
      o, targets, batch, mode='mask', topk_proposals_per_im=8))(outputs)
  slots = _manual_slots(outputs, targets, 8)
  probs = 1 / (1 + np.exp(-_manual_logits(outputs, slots)))
  masks = np.asarray(batch['masks'])[:, :, 2::4, 2::4]
  losses = [_dice_np(p, masks[b, int(targets['gt_index'][b, i])])
            for (b, i), p in zip(slots, probs)]
  np.testing.assert_allclose(float(aux['loss_mask']), np.mean(losses),
                             rtol=1e-4)
  # Pre-sampled masks [B, N, H/4, W/4] give the same loss.
  batch4 = dict(batch, masks=batch['masks'][:, :, 2::4, 2::4])
  _, aux4 = jax.jit(lambda o: condinst.condinst_losses(
      o, targets, batch4, mode='mask', topk_proposals_per_im=8))(outputs)
  np.testing.assert_allclose(float(aux4['loss_mask']),
                             float(aux['loss_mask']), rtol=1e-6)


def test_pairwise_warmup_and_example_valid():
  outputs, batch = _random_problem(3)
  fn = jax.jit(lambda o, bt, s: condinst.condinst_losses(
      o, None, bt, step=s, topk_proposals_per_im=8))
  _, a0 = fn(outputs, batch, 0)
  _, a1 = fn(outputs, batch, 4999)
  assert float(a0['loss_pairwise']) > 0
  np.testing.assert_allclose(float(a1['loss_pairwise']),
                             5000 * float(a0['loss_pairwise']), rtol=1e-4)
  # loss.pairwise_weight multiplies the warmed-up term (default 1.0).
  weighted = (mask_terms.projection_term, functools.partial(
      mask_terms.pairwise_term, warmup_iters=10000, weight=3.0))
  _, a3 = jax.jit(lambda o, bt, s: condinst.condinst_losses(
      o, None, bt, step=s, topk_proposals_per_im=8,
      mask_terms=weighted))(outputs, batch, 0)
  np.testing.assert_allclose(float(a3['loss_pairwise']),
                             3 * float(a0['loss_pairwise']), rtol=1e-5)
  np.testing.assert_allclose(float(a3['loss_prj']), float(a0['loss_prj']),
                             rtol=1e-6)
  # Dropping image 1 removes its positives and its mask-head slots.
  _, a2 = fn(outputs, dict(batch, example_valid=jnp.array([True, False])), 0)
  targets = _targets(batch)
  assert float(a2['num_pos']) == float(targets['positive'][0].sum())
  assert float(a2['num_mask_instances']) == len(
      [s for s in _manual_slots(outputs, targets, 8) if s[0] == 0])


def test_no_instances_gives_zero_mask_losses():
  outputs, batch = _random_problem(4)
  batch = dict(batch, instance_valid=jnp.zeros((B, N), bool))
  fn = jax.jit(jax.value_and_grad(
      lambda o: condinst.condinst_losses(o, None, batch,
                                         topk_proposals_per_im=8),
      has_aux=True))
  (total, aux), grads = fn(outputs)
  assert float(aux['num_pos']) == 0 and float(aux['num_mask_instances']) == 0
  assert float(aux['loss_prj']) == 0 and float(aux['loss_pairwise']) == 0
  assert np.isfinite(float(total))
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))


def test_rows_removed_sources():
  batch = {'image_valid': jnp.ones((2, 8, 8), bool)}
  np.testing.assert_array_equal(mask_terms.rows_removed(batch, 10), [10, 10])
  scaled = dict(batch, scale=jnp.array([[1.6667, 1.6667], [0.5, 0.5]]))
  np.testing.assert_array_equal(mask_terms.rows_removed(scaled, 10), [16, 5])
  given = dict(scaled, rows_removed=jnp.array([3, 4]))
  np.testing.assert_array_equal(mask_terms.rows_removed(given, 10), [3, 4])


def test_boxteacher_term_matches_manual():
  outputs, batch = _random_problem(5, with_masks=True)
  targets = _targets(batch)
  pseudo = np.asarray(batch['masks'])[:, :, 2::4, 2::4].astype(np.float32)
  flags = np.array([[0.9, 0.0, 0.6, 0.0], [0.7, 0.3, 0.0, 0.0]], np.float32)
  bt = dict(batch, pseudo_masks=jnp.asarray(pseudo),
            pseudo_flags=jnp.asarray(flags))
  del bt['masks']  # the term must not read GT masks
  term = functools.partial(mask_terms.boxteacher_term, warmup_iters=10)
  terms = (mask_terms.projection_term, term)
  _, aux = jax.jit(lambda o: condinst.condinst_losses(
      o, targets, bt, mask_terms=terms, step=4, topk_proposals_per_im=8))(
          outputs)
  slots = _manual_slots(outputs, targets, 8)
  probs = 1 / (1 + np.exp(-_manual_logits(outputs, slots)))
  num, den = 0.0, 0
  for (b, i), p in zip(slots, probs):
    g = int(targets['gt_index'][b, i])
    x0, y0, x1, y1 = np.asarray(batch['boxes'][b, g])
    full = np.zeros((H, W))
    full[int(y0):int(y1 + 1), int(x0):int(x1 + 1)] = 1
    clipped = pseudo[b, g] * full[2::4, 2::4]
    num += flags[b, g] * _dice_np(p, clipped > 0.5)
    den += int(flags[b, g] > 0)
  warm = 5 / 10  # (step + 1) / warmup_iters
  assert den > 0 and float(aux['num_pseudo_masks']) == den
  np.testing.assert_allclose(float(aux['loss_mask']),
                             0.5 * warm * num / den, rtol=1e-4)
  assert float(aux['mask_warmup']) == pytest.approx(warm)
  assert float(aux['loss_mask_affinity']) > 0
  assert 'loss_pairwise' not in aux and 'loss_prj' in aux
