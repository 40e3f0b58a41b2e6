"""Mask-loss terms of CondInst-based methods and what they share.

A term is a function `term(inst: MaskInstances) -> dict` of `loss_*` values
(summed into the total by `condinst.condinst_losses`) and metrics. The
shared ones are BoxInst's projection and pairwise terms (§3.4-3.5) and dice
against GT masks (§2.5); BoxTeacher adds `boxteacher_term` (§4.6), and the
BoxSeg terms plug in the same way. `MaskInstances` holds the slots' mask
logits and computes what several terms share (slot box masks, the pairwise
validity, the colour similarity) once, on first use.
"""

from collections.abc import Callable
import dataclasses
import functools

import jax
import jax.numpy as jnp

from boxseg_jax.losses import boxinst
from boxseg_jax.losses import boxteacher as boxteacher_losses
from boxseg_jax.losses.dice import dice_loss


def rows_removed(batch: dict, bottom_pixels_removed: int) -> jnp.ndarray:
  """Per-image bottom rows to drop from the pairwise validity mask."""
  num = batch['image_valid'].shape[0]
  if 'rows_removed' in batch:
    return jnp.asarray(batch['rows_removed'], jnp.int32)
  if 'scale' in batch:
    # int(10 * h_resized / h_original); scale = (sy, sx) = resized / original.
    sy = jnp.asarray(batch['scale'], jnp.float32)[:, 0]
    return jnp.floor(bottom_pixels_removed * sy).astype(jnp.int32)
  return jnp.full((num,), int(bottom_pixels_removed), jnp.int32)


def take_slots(x: jnp.ndarray, idx: jnp.ndarray) -> jnp.ndarray:
  """`x [B, M, ...]`, `idx [B, S]` -> `[B, S, ...]`."""
  idx = idx.reshape(idx.shape + (1,) * (x.ndim - 2))
  return jnp.take_along_axis(x, idx, axis=1)


@dataclasses.dataclass
class MaskInstances:
  """The mask-head instances of a batch and what their terms share.

  Attributes:
    logits: `[B, S, h, w]` mask logits of the slots.
    slot_valid: `[B, S]` bool, slots holding an instance.
    slot_gt: `[B, S]` int32 GT index of each slot (0 where invalid).
    batch: the batch dict (contract + method inputs such as pseudo masks).
    step: optimizer steps already taken.
    mask_out_stride: stride of the mask grid (4).
    bottom_pixels_removed: BoxInst `BOTTOM_PIXELS_REMOVED`.
    pairwise_size: pairwise kernel size.
    pairwise_dilation: pairwise dilation.
  """
  logits: jnp.ndarray
  slot_valid: jnp.ndarray
  slot_gt: jnp.ndarray
  batch: dict
  step: jnp.ndarray | int = 0
  mask_out_stride: int = 4
  bottom_pixels_removed: int = 10
  pairwise_size: int = 3
  pairwise_dilation: int = 2

  @property
  def grid_shape(self) -> tuple[int, int]:
    return self.logits.shape[-2:]

  @functools.cached_property
  def scores(self) -> jnp.ndarray:
    return jax.nn.sigmoid(self.logits)

  @functools.cached_property
  def slot_f(self) -> jnp.ndarray:
    return self.slot_valid.astype(jnp.float32)

  @functools.cached_property
  def num_instances(self) -> jnp.ndarray:
    return self.slot_f.sum()

  def take(self, per_gt: jnp.ndarray) -> jnp.ndarray:
    """`[B, N, ...]` per-GT values -> `[B, S, ...]` per slot."""
    return take_slots(per_gt, self.slot_gt)

  def mean_over_slots(self, per_slot: jnp.ndarray) -> jnp.ndarray:
    return (per_slot * self.slot_f).sum() / jnp.maximum(
        self.num_instances, 1.0)

  @functools.cached_property
  def box_masks(self) -> jnp.ndarray:
    """`[B, S, h, w]` box mask of each slot's GT (reference §3.1)."""
    slot_boxes = self.take(self.batch['boxes'].astype(jnp.float32))
    return boxinst.box_masks_at_stride(slot_boxes, self.grid_shape,
                                       self.mask_out_stride)

  @functools.cached_property
  def validity(self) -> jnp.ndarray:
    """`[B, h, w]` pairwise validity: image, bottom rows removed (§3.2)."""
    return jax.vmap(
        lambda v, r: boxinst.image_validity_at_stride(
            v, r, self.mask_out_stride))(
                self.batch['image_valid'],
                rows_removed(self.batch, self.bottom_pixels_removed))

  @functools.cached_property
  def similarity(self) -> jnp.ndarray:
    """`[B, E, h, w]` colour similarity of the un-augmented view (§3.3)."""
    image = self.batch['image_teacher'].astype(jnp.float32) * self.batch[
        'image_valid'][..., None].astype(jnp.float32)
    return jax.vmap(
        lambda im, v: boxinst.color_similarity(
            im, v, stride=self.mask_out_stride, size=self.pairwise_size,
            dilation=self.pairwise_dilation))(image, self.validity)


MaskTerm = Callable[[MaskInstances], dict]


def projection_term(inst: MaskInstances) -> dict:
  """BoxInst projection term, mean over valid slots (§3.4)."""
  h, w = inst.grid_shape
  proj = boxinst.projection_loss(
      inst.scores.reshape(-1, h, w),
      inst.box_masks.reshape(-1, h, w)).reshape(inst.slot_valid.shape)
  return {'loss_prj': inst.mean_over_slots(proj)}


def pairwise_term(inst: MaskInstances, *, color_thresh: float = 0.3,
                  warmup_iters: int = 10000, weight: float = 1.0) -> dict:
  """BoxInst colour-pairwise term with its warm-up (§3.5).

  `weight` multiplies the warmed-up term; the reference has none (1.0).
  """
  loss, _ = boxinst.pairwise_loss(
      inst.logits, inst.similarity[:, None], inst.box_masks,
      inst.slot_valid, color_thresh=color_thresh, size=inst.pairwise_size,
      dilation=inst.pairwise_dilation)
  warmup = boxinst.pairwise_warmup_factor(inst.step, warmup_iters)
  return {'loss_pairwise': weight * warmup * loss, 'pairwise_warmup': warmup}


def gt_mask_term(inst: MaskInstances) -> dict:
  """Dice against GT masks (fully supervised CondInst, §2.5)."""
  h, w = inst.grid_shape
  masks = inst.batch['masks']
  if masks.shape[-2:] != (h, w):
    s = inst.mask_out_stride
    masks = masks[..., s // 2::s, s // 2::s]
  slot_masks = inst.take(masks.astype(jnp.float32))
  dice = dice_loss(inst.scores.reshape(-1, h, w),
                   slot_masks.reshape(-1, h, w)).reshape(
                       inst.slot_valid.shape)
  return {'loss_mask': inst.mean_over_slots(dice)}


def boxteacher_term(inst: MaskInstances, *, mask_weight: float = 0.5,
                    affinity_weight: float = 0.1,
                    affinity_thresh: float = 0.5,
                    warmup_iters: int = 10000) -> dict:
  """BoxTeacher's noise-aware pixel + affinity losses (§4.5-4.6).

  Reads `batch['pseudo_masks']` `[B, N, h, w]` (binary, from the teacher)
  and `batch['pseudo_flags']` `[B, N]` (mask scores, 0 = no pseudo mask).
  """
  pseudo = inst.take(inst.batch['pseudo_masks'].astype(jnp.float32))
  flags = inst.take(inst.batch['pseudo_flags'].astype(jnp.float32))
  flags = jax.lax.stop_gradient(flags)
  # §4.5 step 3: clip to the GT box; the affinity uses the clipped mask,
  # the pixel loss its binarisation (step 5).
  pseudo = jax.lax.stop_gradient(pseudo * inst.box_masks)
  warmup = boxinst.pairwise_warmup_factor(inst.step, warmup_iters)
  pixel = boxteacher_losses.noise_aware_pixel_loss(
      inst.scores, (pseudo > 0.5).astype(jnp.float32), flags,
      inst.slot_valid)
  affinity = boxteacher_losses.noise_reduced_affinity_loss(
      inst.logits, pseudo, inst.validity, inst.box_masks, flags,
      inst.slot_valid, thresh=affinity_thresh, size=inst.pairwise_size,
      dilation=inst.pairwise_dilation)
  return {
      'loss_mask': mask_weight * warmup * pixel,
      'loss_mask_affinity': affinity_weight * warmup * affinity,
      'mask_warmup': warmup,
      'num_pseudo_masks': jnp.sum(
          ((flags > 0) & inst.slot_valid).astype(jnp.float32)),
  }
