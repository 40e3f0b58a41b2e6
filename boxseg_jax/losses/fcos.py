"""FCOS losses (reference §1.5): focal or varifocal classification, GIoU box,
box quality.

All functions take the GLOBAL batch (`[B, L, ...]`) inside one jitted program,
so the reference's all-reduced normalisers become global sums/counts:
`num_pos_avg = max(global #positives, 1)` and the GIoU normaliser
`max(global sum ctr*, 1e-6)`. (The reference clamps the per-device mean; we
clamp the global count: identical whenever any device has a positive.)
"""

import jax
import jax.numpy as jnp

from boxseg_jax.ops.boxes import iou_giou_ltrb
from boxseg_jax.targets import ctrness_target

__all__ = [
    'binary_cross_entropy_with_logits', 'ctrness_target', 'fcos_losses',
    'iou_giou_ltrb', 'sigmoid_focal_loss', 'varifocal_loss',
]

CLS_LOSSES = ('focal', 'varifocal')


def binary_cross_entropy_with_logits(logits: jnp.ndarray,
                                     targets: jnp.ndarray) -> jnp.ndarray:
  """Elementwise `-(t log σ(z) + (1-t) log(1-σ(z)))`, stable form."""
  return (jnp.maximum(logits, 0.0) - logits * targets +
          jnp.log1p(jnp.exp(-jnp.abs(logits))))


def sigmoid_focal_loss(logits: jnp.ndarray, targets: jnp.ndarray,
                       alpha: float = 0.25, gamma: float = 2.0) -> jnp.ndarray:
  """Elementwise sigmoid focal loss (fvcore `sigmoid_focal_loss`, no reduction).

  `p = σ(z)`, `ce = BCE(z, t)`, `p_t = p t + (1-p)(1-t)`,
  `loss = α_t · ce · (1 - p_t)^γ` with `α_t = α t + (1-α)(1-t)`
  (no α weighting when `alpha < 0`).
  """
  p = jax.nn.sigmoid(logits)
  ce = binary_cross_entropy_with_logits(logits, targets)
  p_t = p * targets + (1.0 - p) * (1.0 - targets)
  loss = ce * (1.0 - p_t) ** gamma
  if alpha >= 0:
    loss = (alpha * targets + (1.0 - alpha) * (1.0 - targets)) * loss
  return loss


def varifocal_loss(logits: jnp.ndarray, targets: jnp.ndarray,
                   alpha: float = 0.25, gamma: float = 2.0) -> jnp.ndarray:
  """Elementwise varifocal loss (VarifocalNet; BoxSeg `vfl_loss`, §4C.3).

  `ℓ = BCE(z, t) · w` with `w = t` where `t > 0` (IoU-valued targets of the
  positives' classes) and `w = α |σ(z) - t|^γ = α σ(z)^γ` elsewhere. As in
  the reference, the negatives' weight is not detached. BoxSeg's code uses
  FCOS's `α = 0.25`; VarifocalNet's own default is 0.75.
  """
  p = jax.nn.sigmoid(logits)
  weight = jnp.where(targets > 0, targets,
                     alpha * jnp.abs(p - targets) ** gamma)
  return binary_cross_entropy_with_logits(logits, targets) * weight


def fcos_losses(outputs: dict,
                targets: dict,
                example_valid: jnp.ndarray | None = None,
                *,
                box_quality: str = 'ctrness',
                focal_alpha: float = 0.25,
                focal_gamma: float = 2.0,
                cls_loss: str = 'focal',
                vfl_alpha: float = 0.25,
                vfl_gamma: float = 2.0,
                cls_location_weight: jnp.ndarray | None = None) -> dict:
  """FCOS losses over the global batch.

  Args:
    outputs: `cls_logits [B, L, C]`, `reg [B, L, 4]` (ltrb, stride units,
      non-negative), `ctrness [B, L]` (logit of centerness or of IoU).
    targets: stacked `targets.fcos_targets` dict: `labels [B, L]` (C =
      background), `reg_targets [B, L, 4]`, `ctrness [B, L]`,
      `positive [B, L]`.
    example_valid: optional `[B]` bool; padded examples contribute nothing.
    box_quality: `'ctrness'` (default): GIoU weighted by ctr*, normalised by
      `max(Σ ctr*, 1e-6)`; BCE(ctr logit, ctr*) / num_pos_avg.
      `'iou'` (BoxSeg): BCE(quality logit, stop_gradient(IoU)) / num_pos_avg
      and unweighted GIoU loss / num_pos_avg.
    focal_alpha: focal α.
    focal_gamma: focal γ.
    cls_loss: `'focal'` (one-hot targets) or `'varifocal'` (BoxSeg, §4C.3:
      the positives' class target is the detached IoU of the predicted box
      with its GT box, `compute_ious` on the ltrb distances, 0 elsewhere;
      `varifocal_loss`), both summed and divided by `num_pos_avg`; the
      result is `loss_fcos_cls` either way.
    vfl_alpha: varifocal α (0.25 as BoxSeg's code; VarifocalNet: 0.75).
    vfl_gamma: varifocal γ.
    cls_location_weight: optional `[B, L]` weight of each location's focal
      loss (summed over classes), e.g. DropLoss; the normaliser is unchanged.

  Returns:
    dict of f32 scalars: `loss_fcos_cls`, `loss_fcos_loc`, `loss_fcos_ctr`,
    `num_pos` (global positive count, unclamped).
  """
  cls_logits = outputs['cls_logits'].astype(jnp.float32)
  reg = outputs['reg'].astype(jnp.float32)
  ctr_logits = outputs['ctrness'].astype(jnp.float32)
  num_classes = cls_logits.shape[-1]
  positive = targets['positive']
  loc_weight = jnp.ones(positive.shape, jnp.float32)
  if example_valid is not None:
    positive = positive & example_valid[:, None]
    loc_weight = loc_weight * example_valid[:, None].astype(jnp.float32)
  if cls_location_weight is not None:
    loc_weight = loc_weight * cls_location_weight.astype(jnp.float32)
  pos_f = positive.astype(jnp.float32)

  num_pos = pos_f.sum()
  num_pos_avg = jnp.maximum(num_pos, 1.0)

  # Non-positive locations get a dummy unit target so that GIoU (no eps in C)
  # and its gradient stay finite; they are masked out below.
  reg_targets = jnp.where(positive[..., None],
                          targets['reg_targets'].astype(jnp.float32), 1.0)
  ious, gious = iou_giou_ltrb(reg, reg_targets)
  giou_loss = 1.0 - gious

  labels = jnp.where(positive, targets['labels'], num_classes)
  one_hot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  if cls_loss == 'focal':
    per_entry = sigmoid_focal_loss(cls_logits, one_hot, focal_alpha,
                                   focal_gamma)
  elif cls_loss == 'varifocal':
    iou_t = jax.lax.stop_gradient(jnp.where(positive, ious, 0.0))
    per_entry = varifocal_loss(cls_logits, one_hot * iou_t[..., None],
                               vfl_alpha, vfl_gamma)
  else:
    raise ValueError(f'cls_loss must be one of {CLS_LOSSES}, got '
                     f'{cls_loss!r}')
  loss_cls = (per_entry.sum(-1) * loc_weight).sum() / num_pos_avg

  if box_quality == 'ctrness':
    ctr_t = jnp.where(positive, targets['ctrness'].astype(jnp.float32), 0.0)
    loss_loc = (ctr_t * giou_loss * pos_f).sum() / jnp.maximum(ctr_t.sum(),
                                                               1e-6)
    loss_ctr = (binary_cross_entropy_with_logits(ctr_logits, ctr_t) *
                pos_f).sum() / num_pos_avg
  elif box_quality == 'iou':
    iou_t = jax.lax.stop_gradient(ious)
    loss_loc = (giou_loss * pos_f).sum() / num_pos_avg
    loss_ctr = (binary_cross_entropy_with_logits(ctr_logits, iou_t) *
                pos_f).sum() / num_pos_avg
  else:
    raise ValueError(f'box_quality must be "ctrness" or "iou", got '
                     f'{box_quality!r}')
  return {
      'loss_fcos_cls': loss_cls,
      'loss_fcos_loc': loss_loc,
      'loss_fcos_ctr': loss_ctr,
      'num_pos': num_pos,
  }
