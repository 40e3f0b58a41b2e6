"""CondInst training losses: FCOS + instance selection + mask terms.

Instance layout: every image gets a fixed budget of `num_slots` mask-head
slots (default `topk_proposals_per_im` = 64) filled from its FCOS positives,
with a validity mask for empty slots; the dynamic head runs vmapped per
image on `[B, K, ...]` (see `ops.dynamic_mask_head`).

Mask losses are *terms* (`losses.mask_terms`): the base modes use BoxInst's
projection + pairwise terms or dice against GT masks; a method passes its
own list (`mask_terms=(...)`) and puts its extra inputs (pseudo masks,
flags) in the batch.

Normalisation over the global batch (one jitted program): FCOS losses as in
`losses.fcos`; projection, dice and pairwise terms are averaged over all
valid slots / all weighted edges of the batch (the reference averages per
device, then DDP averages the device means; see docs/losses.md).
"""

from collections.abc import Sequence
import functools

import jax
import jax.numpy as jnp

from boxseg_jax import targets as targets_lib
from boxseg_jax.losses import mask_terms as terms_lib
from boxseg_jax.losses.fcos import fcos_losses
from boxseg_jax.ops.dynamic_mask_head import dynamic_mask_logits_batched
from boxseg_jax.ops.dynamic_mask_head import mask_head_soi
from boxseg_jax.ops.locations import fcos_locations
from boxseg_jax.ops import topk


def proposal_scores(cls_logits: jnp.ndarray,
                    ctrness_logits: jnp.ndarray) -> jnp.ndarray:
  """Detached ranking score `max_c σ(cls_c) · σ(ctr)`, `[..., L]`."""
  score = jax.nn.sigmoid(cls_logits.max(-1)) * jax.nn.sigmoid(ctrness_logits)
  return jax.lax.stop_gradient(score.astype(jnp.float32))


def topk_per_gt_keep(positive: jnp.ndarray,
                     gt_index: jnp.ndarray,
                     scores: jnp.ndarray,
                     *,
                     num_gt: int,
                     topk_per_image: int = 64) -> jnp.ndarray:
  """`[L]` bool: the positives the reference's top-k-per-GT rule keeps.

  Every GT present among the positives keeps its top
  `max(int(topk_per_image / U), 1)` positives by `scores` (ties: lower
  location index first); see `select_topk_per_gt`.
  """
  num_loc = positive.shape[0]
  g = jnp.where(positive, gt_index, num_gt).astype(jnp.int32)
  present = jnp.zeros((num_gt + 1,), bool).at[g].set(True)[:num_gt]
  num_unique = jnp.sum(present.astype(jnp.int32))
  quota = jnp.maximum(topk_per_image // jnp.maximum(num_unique, 1), 1)
  order = jnp.lexsort((-scores.astype(jnp.float32), g))
  g_sorted = g[order]
  group_start = jnp.searchsorted(g_sorted, g_sorted, side='left')
  rank_sorted = jnp.arange(num_loc, dtype=jnp.int32) - group_start
  rank = jnp.zeros((num_loc,), jnp.int32).at[order].set(rank_sorted)
  return positive & (rank < quota)


def select_topk_per_gt(positive: jnp.ndarray,
                       gt_index: jnp.ndarray,
                       scores: jnp.ndarray,
                       *,
                       num_gt: int,
                       topk_per_image: int = 64,
                       num_slots: int | None = None
                       ) -> tuple[jnp.ndarray, jnp.ndarray]:
  """`TOPK_PROPOSALS_PER_IM` selection for one image (reference §2.4).

  With U = number of distinct GTs among the positives, every GT keeps its
  top `max(int(topk_per_image / U), 1)` positives by `scores` (ties: lower
  location index first). The kept locations fill `num_slots` slots; when
  more are kept than there are slots (`U > num_slots`, or a `num_slots`
  below `topk_per_image`), the highest-scored ones fill the slots and
  `condinst_losses` reports the rest as `mask_slots_overflow`.

  Args:
    positive: `[L]` bool FCOS positives.
    gt_index: `[L]` int GT index of each location (any value where not
      positive).
    scores: `[L]` ranking scores (detached).
    num_gt: static number of GT rows `N` of the image.
    topk_per_image: the reference's 64.
    num_slots: static slot count (default `topk_per_image`).

  Returns:
    `(location_index [S] int32, slot_valid [S] bool)`.
  """
  num_slots = topk_per_image if num_slots is None else num_slots
  keep = topk_per_gt_keep(positive, gt_index, scores, num_gt=num_gt,
                          topk_per_image=topk_per_image)
  return fill_slots(keep, scores, num_slots)


def fill_slots(keep: jnp.ndarray, scores: jnp.ndarray,
               num_slots: int) -> tuple[jnp.ndarray, jnp.ndarray]:
  """The `num_slots` highest-scored kept locations of one image.

  Returns:
    `(location_index [S] int32, slot_valid [S] bool)`.
  """
  priority = jnp.where(keep, scores.astype(jnp.float32), -1.0)
  _, idx = topk.top_k(priority, num_slots)
  return idx.astype(jnp.int32), keep[idx]


def select_random(positive: jnp.ndarray, rng: jax.Array, *,
                  num_slots: int) -> tuple[jnp.ndarray, jnp.ndarray]:
  """`MAX_PROPOSALS`-style uniform random subset of one image's positives."""
  priority = jnp.where(positive, jax.random.uniform(rng, positive.shape), -1.0)
  _, idx = topk.top_k(priority, num_slots)
  return idx.astype(jnp.int32), positive[idx]


def default_mask_terms(mode: str, *, pairwise_color_thresh: float = 0.3,
                       pairwise_warmup_iters: int = 10000
                       ) -> tuple[terms_lib.MaskTerm, ...]:
  """The terms of the two base modes: `'boxinst'` and `'mask'`."""
  if mode == 'boxinst':
    return (terms_lib.projection_term,
            functools.partial(terms_lib.pairwise_term,
                              color_thresh=pairwise_color_thresh,
                              warmup_iters=pairwise_warmup_iters))
  if mode == 'mask':
    return (terms_lib.gt_mask_term,)
  raise ValueError(f'mode must be "boxinst" or "mask", got {mode!r}')


def select_instances(outputs: dict, targets: dict, example_valid, *,
                     num_gt: int, topk_proposals_per_im: int,
                     num_slots: int, proposal_selection: str,
                     rng: jax.Array | None):
  """Mask-head slots of every image: `(loc_idx, slot_valid, num_kept)`."""
  positive = targets['positive'] & example_valid[:, None]
  bsz = positive.shape[0]
  if proposal_selection == 'topk_per_gt':
    scores = proposal_scores(outputs['cls_logits'], outputs['ctrness'])
    keep = jax.vmap(
        lambda p, g, s: topk_per_gt_keep(
            p, g, s, num_gt=num_gt, topk_per_image=topk_proposals_per_im))(
                positive, targets['gt_index'], scores)
    loc_idx, slot_valid = jax.vmap(
        lambda k, s: fill_slots(k, s, num_slots))(keep, scores)
    return loc_idx, slot_valid, keep.sum(-1)
  if proposal_selection == 'random':
    if rng is None:
      raise ValueError('proposal_selection="random" needs rng')
    loc_idx, slot_valid = jax.vmap(
        lambda p, k: select_random(p, k, num_slots=num_slots))(
            positive, jax.random.split(rng, bsz))
    return loc_idx, slot_valid, positive.sum(-1)
  raise ValueError(f'unknown proposal_selection {proposal_selection!r}')


def batch_targets(batch: dict, *, num_classes: int,
                  sizes_of_interest: Sequence[float] = (64, 128, 256, 512),
                  center_sampling_radius: float = 1.5) -> dict:
  """FCOS targets of a batch on its canvas (`targets.fcos_targets`, `[B, L,
  ...]`): what `condinst_losses` computes when given `targets=None`, for
  callers that need them before the loss (e.g. DropLoss weights)."""
  height, width = batch['image_valid'].shape[1:]
  locs = fcos_locations(height, width)
  return targets_lib.batch_fcos_targets(
      jnp.asarray(locs.points), jnp.asarray(locs.levels),
      jnp.asarray(locs.strides), batch['boxes'], batch['labels'],
      batch['instance_valid'], num_classes=num_classes,
      sizes_of_interest=sizes_of_interest,
      center_sampling_radius=center_sampling_radius)


def condinst_losses(outputs: dict,
                    targets: dict | None,
                    batch: dict,
                    *,
                    mode: str = 'boxinst',
                    mask_terms: Sequence[terms_lib.MaskTerm] | None = None,
                    step: jnp.ndarray | int = 0,
                    topk_proposals_per_im: int = 64,
                    num_slots: int | None = None,
                    proposal_selection: str = 'topk_per_gt',
                    rng: jax.Array | None = None,
                    sizes_of_interest: Sequence[float] = (64, 128, 256, 512),
                    center_sampling_radius: float = 1.5,
                    box_quality: str = 'ctrness',
                    cls_loss: str = 'focal',
                    vfl_alpha: float = 0.25,
                    vfl_gamma: float = 2.0,
                    mask_feat_stride: int = 8,
                    mask_out_stride: int = 4,
                    mask_head_channels: int = 8,
                    mask_head_num_layers: int = 3,
                    bottom_pixels_removed: int = 10,
                    pairwise_size: int = 3,
                    pairwise_dilation: int = 2,
                    pairwise_color_thresh: float = 0.3,
                    pairwise_warmup_iters: int = 10000,
                    cls_location_weight: jnp.ndarray | None = None
                    ) -> tuple[jnp.ndarray, dict]:
  """CondInst loss of the global batch: FCOS + mask terms.

  Args:
    outputs: network outputs, `cls_logits [B, L, C]`, `reg [B, L, 4]`,
      `ctrness [B, L]`, `controller [B, L, P]`, `mask_feats [B, h8, w8, Cm]`.
    targets: stacked `targets.fcos_targets` dict (`[B, L, ...]`), or None to
      compute it here from `batch`.
    batch: the batch contract (design.md): `image_valid [B, H, W]`,
      `boxes [B, N, 4]`, `labels [B, N]`, `instance_valid [B, N]`,
      `example_valid [B]` (optional); `image_teacher [B, H, W, 3]` raw RGB
      0..255 for the pairwise term; `masks` (`[B, N, H/4, W/4]` already
      point-sampled, or `[B, N, H, W]` full resolution) for `gt_mask_term`;
      method inputs (e.g. `pseudo_masks`, `pseudo_flags`) for their terms.
      Optional `rows_removed [B]` int (bottom rows dropped from the pairwise
      validity, `boxinst.bottom_rows_removed`), else derived from `scale
      [B, 2]` (sy, sx) when present, else `bottom_pixels_removed`.
    mode: `'boxinst'` (projection + colour pairwise) or `'mask'` (dice
      against GT masks); ignored when `mask_terms` is given.
    mask_terms: the mask terms to add (see module docstring).
    step: optimizer steps already taken (warm-ups use `step + 1`).
    topk_proposals_per_im: the reference's `TOPK_PROPOSALS_PER_IM` (64).
    num_slots: mask-head slots per image (default `topk_proposals_per_im`).
    proposal_selection: `'topk_per_gt'` (reference §2.4) or `'random'`
      (`MAX_PROPOSALS`-style, uniform among positives, needs `rng`).
    rng: PRNG key for `'random'`.
    sizes_of_interest: FCOS size thresholds (also the mask-head soi).
    center_sampling_radius: FCOS center sampling radius (targets=None).
    box_quality: `'ctrness'` or `'iou'` (see `fcos_losses`).
    cls_loss: `'focal'` or `'varifocal'` (see `fcos_losses`).
    vfl_alpha: varifocal α.
    vfl_gamma: varifocal γ.
    mask_feat_stride: stride of `mask_feats` (8).
    mask_out_stride: stride of the mask logits (4).
    mask_head_channels: dynamic head width (8).
    mask_head_num_layers: dynamic head depth (3).
    bottom_pixels_removed: BoxInst `BOTTOM_PIXELS_REMOVED` (10).
    pairwise_size: pairwise kernel size (3).
    pairwise_dilation: pairwise dilation (2).
    pairwise_color_thresh: τ (0.3) of the `'boxinst'` mode.
    pairwise_warmup_iters: warm-up length (10000) of the `'boxinst'` mode.
    cls_location_weight: optional `[B, L]` focal-loss weight (DropLoss).

  Returns:
    `(total, aux)`: scalar f32 total loss (the sum of every `loss_*`) and a
    dict of f32 scalars: `loss_fcos_cls`, `loss_fcos_loc`, `loss_fcos_ctr`,
    the terms' losses and metrics, `num_pos`, `num_mask_instances`,
    `mask_slots_overflow` (instances the selection kept that did not fit in
    `num_slots`; for `'random'`, positives not drawn).
  """
  if mask_terms is None:
    mask_terms = default_mask_terms(
        mode, pairwise_color_thresh=pairwise_color_thresh,
        pairwise_warmup_iters=pairwise_warmup_iters)
  image_valid = batch['image_valid']
  bsz, height, width = image_valid.shape
  num_classes = outputs['cls_logits'].shape[-1]
  example_valid = batch.get('example_valid')
  if example_valid is None:
    example_valid = jnp.ones((bsz,), bool)
  example_valid = jnp.asarray(example_valid, bool)

  locs = fcos_locations(height, width)
  if locs.points.shape[0] != outputs['cls_logits'].shape[1]:
    raise ValueError(f'outputs have {outputs["cls_logits"].shape[1]} '
                     f'locations, a {height}x{width} canvas has '
                     f'{locs.points.shape[0]}')
  points = jnp.asarray(locs.points)
  levels = jnp.asarray(locs.levels)
  if targets is None:
    targets = batch_targets(batch, num_classes=num_classes,
                            sizes_of_interest=sizes_of_interest,
                            center_sampling_radius=center_sampling_radius)

  aux = fcos_losses(outputs, targets, example_valid, box_quality=box_quality,
                    cls_loss=cls_loss, vfl_alpha=vfl_alpha,
                    vfl_gamma=vfl_gamma,
                    cls_location_weight=cls_location_weight)

  # Instance selection (no gradient through the choice).
  num_slots = topk_proposals_per_im if num_slots is None else num_slots
  loc_idx, slot_valid, num_kept = select_instances(
      outputs, targets, example_valid, num_gt=batch['boxes'].shape[1],
      topk_proposals_per_im=topk_proposals_per_im, num_slots=num_slots,
      proposal_selection=proposal_selection, rng=rng)
  slot_gt = jnp.maximum(
      jnp.take_along_axis(targets['gt_index'], loc_idx, axis=1), 0)
  logits = dynamic_mask_logits_batched(
      outputs['mask_feats'],
      terms_lib.take_slots(outputs['controller'], loc_idx),
      points[loc_idx], mask_head_soi(levels[loc_idx], sizes_of_interest),
      mask_feat_stride=mask_feat_stride, mask_out_stride=mask_out_stride,
      channels=mask_head_channels, num_layers=mask_head_num_layers)
  inst = terms_lib.MaskInstances(
      logits=logits, slot_valid=slot_valid, slot_gt=slot_gt, batch=batch,
      step=step, mask_out_stride=mask_out_stride,
      bottom_pixels_removed=bottom_pixels_removed,
      pairwise_size=pairwise_size, pairwise_dilation=pairwise_dilation)
  for term in mask_terms:
    out = term(inst)
    clash = set(out) & set(aux)
    if clash:
      raise ValueError(f'mask terms both define {sorted(clash)}')
    aux.update(out)

  aux['num_mask_instances'] = inst.num_instances
  # Selected instances that found no slot (0 whenever the slots suffice).
  aux['mask_slots_overflow'] = jnp.maximum(
      num_kept - slot_valid.sum(-1), 0).sum()
  total = sum(v for k, v in aux.items() if k.startswith('loss_'))
  aux = {k: jnp.asarray(v, jnp.float32) for k, v in aux.items()}
  return jnp.asarray(total, jnp.float32), aux
