"""CondInst detections on device (reference §1.6, §2.6), pure jnp.

`detect` (static shapes, one image; vmap it): FCOS candidates per level, box
decoding, class-aware NMS, a fixed top-K output with a validity mask, and
the dynamic mask head on the kept detections. Masks are returned as
probabilities on the stride-4 grid of the padded canvas; boxes are on the
padded canvas (= resized image coordinates). Used by the evaluation step
and by teachers inside the train step; the host half (paste-back, RLE) is
`evaluation.postprocess`.

Score = `sqrt(σ(cls) · σ(ctr))` (upstream CondInst). The reference keeps
more than `max_detections` when scores tie at the cut; we never do.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from boxseg_jax.ops import boxes as box_ops
from boxseg_jax.ops.dynamic_mask_head import dynamic_mask_logits
from boxseg_jax.ops.dynamic_mask_head import mask_head_soi
from boxseg_jax.ops.locations import FPN_STRIDES
from boxseg_jax.ops.locations import fcos_locations
from boxseg_jax.ops.locations import fpn_level_shapes
from boxseg_jax.ops.nms import batched_nms
from boxseg_jax.ops import topk


def fcos_candidates(outputs: dict,
                    canvas_shape: tuple[int, int],
                    *,
                    score_thresh: float = 0.05,
                    pre_nms_topk: int = 1000,
                    thresh_with_ctr: bool = True,
                    strides: Sequence[int] = FPN_STRIDES) -> dict:
  """Pre-NMS FCOS candidates of one image (reference §1.6 steps 1-2).

  Per level, every (location, class) pair with `q = σ(cls) σ(ctr)` above
  `score_thresh` (or `σ(cls)` above it when `thresh_with_ctr=False`) is a
  candidate; the top `min(pre_nms_topk, L_l * C)` by `q` are kept.

  Args:
    outputs: one image's `cls_logits [L, C]`, `reg [L, 4]`, `ctrness [L]`.
    canvas_shape: padded input `(H, W)`.
    score_thresh: candidate threshold (0.05).
    pre_nms_topk: per-level cap (1000).
    thresh_with_ctr: threshold `q` (True in all BoxInst configs) or `σ(cls)`.
    strides: FPN strides.

  Returns:
    dict of `[M]` arrays, `M = Σ_l min(pre_nms_topk, L_l * C)`: `boxes
    [M, 4]` xyxy canvas pixels (not clipped), `scores` = `sqrt(q)`, `labels`
    int32, `valid` bool, `location_index` int32 into `L`, `level` int32.
  """
  height, width = canvas_shape
  locs = fcos_locations(height, width, strides)
  shapes = fpn_level_shapes(height, width, strides)
  cls_prob = jax.nn.sigmoid(outputs['cls_logits'].astype(jnp.float32))
  ctr_prob = jax.nn.sigmoid(outputs['ctrness'].astype(jnp.float32))
  reg = outputs['reg'].astype(jnp.float32)
  num_classes = cls_prob.shape[-1]
  parts = {k: [] for k in ('boxes', 'scores', 'labels', 'valid',
                           'location_index', 'level')}
  start = 0
  for level, (stride, (h, w)) in enumerate(zip(strides, shapes)):
    n = h * w
    sl = slice(start, start + n)
    q = cls_prob[sl] * ctr_prob[sl, None]
    cand = (q if thresh_with_ctr else cls_prob[sl]) > score_thresh
    k = min(pre_nms_topk, n * num_classes)
    _, flat = topk.top_k(jnp.where(cand, q, -1.0).reshape(-1), k)
    loc = flat // num_classes + start
    label = flat % num_classes
    valid = cand.reshape(-1)[flat]
    points = jnp.asarray(locs.points)[loc]
    parts['boxes'].append(box_ops.ltrb_to_xyxy(points, reg[loc],
                                               float(stride)))
    parts['scores'].append(jnp.sqrt(q.reshape(-1)[flat]))
    parts['labels'].append(label.astype(jnp.int32))
    parts['valid'].append(valid)
    parts['location_index'].append(loc.astype(jnp.int32))
    parts['level'].append(jnp.full((k,), level, jnp.int32))
    start += n
  return {k: jnp.concatenate(v, axis=0) for k, v in parts.items()}


def detect(outputs: dict,
           *,
           score_thresh: float = 0.05,
           pre_nms_topk: int = 1000,
           nms_thresh: float = 0.6,
           max_detections: int = 100,
           thresh_with_ctr: bool = True,
           with_masks: bool = True,
           sizes_of_interest: Sequence[float] = (64, 128, 256, 512),
           mask_feat_stride: int = 8,
           mask_out_stride: int = 4,
           mask_head_channels: int = 8,
           mask_head_num_layers: int = 3,
           strides: Sequence[int] = FPN_STRIDES) -> dict:
  """CondInst detections of ONE image, fixed size (jittable; vmap over B).

  Args:
    outputs: one image's network outputs: `cls_logits [L, C]`, `reg [L, 4]`,
      `ctrness [L]`, `controller [L, P]`, `mask_feats [H/8, W/8, Cm]`.
    score_thresh: candidate threshold.
    pre_nms_topk: per-level candidate cap.
    nms_thresh: class-aware NMS IoU threshold (suppress IoU > it).
    max_detections: static output size (100).
    thresh_with_ctr: see `fcos_candidates`.
    with_masks: run the dynamic mask head on the detections.
    sizes_of_interest: FCOS sizes (mask-head relative-coordinate scale).
    mask_feat_stride: stride of `mask_feats`.
    mask_out_stride: stride of the returned masks.
    mask_head_channels: dynamic head width.
    mask_head_num_layers: dynamic head depth.
    strides: FPN strides.

  Returns:
    dict: `boxes [D, 4]` xyxy on the padded canvas, `scores [D]`
    (`sqrt(σ(cls) σ(ctr))`, descending), `labels [D]` int32, `valid [D]`
    bool, `location_index [D]` int32, and with masks `mask_probs
    [D, H/s, W/s]` (σ of the mask logits, s = `mask_out_stride`). Invalid
    slots hold zeros.
  """
  h8, w8 = outputs['mask_feats'].shape[:2]
  canvas = (h8 * mask_feat_stride, w8 * mask_feat_stride)
  cand = fcos_candidates(outputs, canvas, score_thresh=score_thresh,
                         pre_nms_topk=pre_nms_topk,
                         thresh_with_ctr=thresh_with_ctr, strides=strides)
  idx, valid = batched_nms(cand['boxes'], cand['scores'], cand['labels'],
                           cand['valid'], iou_threshold=nms_thresh,
                           max_output=max_detections)
  vf = valid.astype(jnp.float32)
  det = {
      'boxes': cand['boxes'][idx] * vf[:, None],
      'scores': cand['scores'][idx] * vf,
      'labels': jnp.where(valid, cand['labels'][idx], 0),
      'valid': valid,
      'location_index': jnp.where(valid, cand['location_index'][idx], 0),
  }
  if with_masks:
    loc = det['location_index']
    locs = fcos_locations(canvas[0], canvas[1], strides)
    logits = dynamic_mask_logits(
        outputs['mask_feats'], outputs['controller'][loc],
        jnp.asarray(locs.points)[loc],
        mask_head_soi(jnp.asarray(locs.levels)[loc], sizes_of_interest),
        mask_feat_stride=mask_feat_stride, mask_out_stride=mask_out_stride,
        channels=mask_head_channels, num_layers=mask_head_num_layers)
    det['mask_probs'] = jax.nn.sigmoid(logits) * vf[:, None, None]
  return det
