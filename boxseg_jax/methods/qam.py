"""BoxSeg's Quality-Aware Module (QAM): teacher candidates -> pseudo labels.

Pure jnp, one image at a time (vmapped by `pseudo_labels`), static shapes.
References: §4B (the paper) and §4C (the public code); docs/methods.md has
the table of every paper-vs-code choice and its option.

1. Candidates (§4C.2): the teacher's pre-NMS FCOS candidates
   (`ops.detections.fcos_candidates` at the test thresholds: one per
   (location, class) with `σ(cls) σ(ctr) > 0.05`, top 1000 per level),
   their boxes mapped into the student view (not clipped, as the code) and
   a box score `b`: `σ(cls)` of the candidate's class (`box_score="cls"`,
   the IoU-aware classification score the varifocal loss trains; the
   paper) or `c = sqrt(σ(cls) σ(ctr))` (`"fcos"`, the code).
2. Box-Quality Ranking (§4B.1, §4C.2): per GT the `K_max` candidates of
   highest IoU with its box (`ops.topk.top_k`: a static `[N, K_max]` gather), of
   which the first `K_g` count: adaptive K from the GT's area in
   original-image pixels (paper Eq. 4) or a fixed K (the code's 20); then
   the filters IoU > `min_iou` (after the cut, as the code) and candidate
   class == GT class: before the cut by default (only the GT's class is
   ranked), after it as the code with `class_filter="after_cut"` (a
   wrong-class candidate in the top K is lost, not replaced).
3. The dynamic mask head on the `N K_max` selected candidates only, on the
   teacher's stride-4 grid; the maps reach the student's stride-4 sample
   points through `ops.resample` (the reference's paste-back chain).
4. Quality-aware Masks Fusion (§4B.2): candidates with `b > τ` are used
   with weights `w ∝ sqrt(b IoU)`, normalised; `M = Σ w P` (soft), clipped
   to the GT box, binarised at 0.5. Options: the code's majority vote of
   `P > 0.5` (strict: an even tie is background, §4C.4), and for the
   ablation ladder `top1` (the best-ranked used candidate alone) and `mean`
   (uniform weights). Linear fusions are fused on the teacher grid and
   resampled once per GT: resampling is linear, so this equals fusing the
   resampled maps, at `1/K_max` of the resampling cost.
5. Mask-Quality Scoring (§4B.3): `s = sqrt(mean_used b · mean_{p in box,
   M(p) > 0.5} M(p))` (0 when no pixel of the box passes). Options: the
   code's `mean_k sqrt((1 + b_k)/2 · m̄_k |B_k|/|V| IoU(B_k, V))` over the
   whole image (§4C.4), and `mask_aware`: BoxTeacher's `sqrt(sqrt(b̄) m̄)`
   of the fused map (§4.3; the ladder rows without MQS).

A GT with no used candidate gets an all-zero mask and flag 0, as an
unmatched GT in BoxTeacher. The outputs (`pseudo_masks [B, N, h, w]`,
`pseudo_flags [B, N]`) feed `losses.mask_terms.boxteacher_term` (the
quality-weighted mask loss, §4B.4 = §4C.5).
"""

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from boxseg_jax.losses import boxinst
from boxseg_jax.methods import boxteacher
from boxseg_jax.ops import boxes as box_ops
from boxseg_jax.ops import detections
from boxseg_jax.ops import resample
from boxseg_jax.ops.dynamic_mask_head import dynamic_mask_logits
from boxseg_jax.ops.dynamic_mask_head import mask_head_soi
from boxseg_jax.ops.locations import fcos_locations
from boxseg_jax.ops import topk

K_MODES = ('adaptive', 'fixed')
K_INTERPS = ('sqrt', 'area')
K_AREAS = ('original', 'resized')
BOX_SCORES = ('cls', 'fcos')
FUSIONS = ('weighted', 'vote', 'top1', 'mean')
CLASS_FILTERS = ('after_cut', 'before_cut')
MQS_MODES = ('paper', 'code', 'mask_aware')


@dataclasses.dataclass(frozen=True)
class QAMConfig:
  """Static settings of QAM (`config.qam` plus the teacher's thresholds).

  Attributes:
    k_mode: `adaptive` (paper Eq. 4) or `fixed` (the code).
    k: K of the fixed mode (the code's 20).
    k_min: adaptive K of GTs with side <= `k_small` (2).
    k_max: adaptive K of GTs with side >= `k_large` (10).
    k_small: side `sqrt(area)` below which K = `k_min` (32).
    k_large: side above which K = `k_max` (96).
    k_interp: interpolate linearly in the side `sqrt(area)` (`sqrt`) or in
      the area (`area`), rounded half up.
    k_area: GT area in `original` (COCO's small/medium/large convention,
      through the batch's `scale`) or `resized` image pixels.
    min_iou: keep candidates with IoU > it (0.5), after the top-K cut.
    class_agnostic: False: a candidate must have its GT's class (the code).
    class_filter: `after_cut` (the code: a wrong-class candidate in the
      top K is lost, not replaced) or `before_cut` (only the GT's class is
      ranked, so K counts its own candidates).
    box_score: `cls` (σ(cls) of the candidate's class) or `fcos` (c).
    tau: used candidates have `b > tau`.
    fusion: `weighted`, `vote`, `top1` or `mean`.
    mqs: `paper`, `code` or `mask_aware`.
    mask_threshold: binarisation of fused maps and candidate masks (0.5).
    score_thresh: candidate threshold (`eval.score_thresh`, 0.05).
    pre_nms_topk: candidates per level (`eval.pre_nms_topk`, 1000).
    thresh_with_ctr: threshold `σ(cls) σ(ctr)` (True) or `σ(cls)`.
    sizes_of_interest: FCOS sizes (mask-head relative coordinates).
    mask_head_channels: dynamic head width.
    mask_head_num_layers: dynamic head depth.
    mask_feat_stride: stride of `mask_feats` (8).
    mask_stride: mask grid stride (4).
  """
  k_mode: str = 'adaptive'
  k: int = 20
  k_min: int = 2
  k_max: int = 10
  k_small: float = 32.0
  k_large: float = 96.0
  k_interp: str = 'sqrt'
  k_area: str = 'original'
  min_iou: float = 0.5
  class_agnostic: bool = False
  class_filter: str = 'before_cut'
  box_score: str = 'cls'
  tau: float = 0.1
  fusion: str = 'weighted'
  mqs: str = 'paper'
  mask_threshold: float = 0.5
  score_thresh: float = 0.05
  pre_nms_topk: int = 1000
  thresh_with_ctr: bool = True
  sizes_of_interest: Sequence[float] = (64, 128, 256, 512)
  mask_head_channels: int = 8
  mask_head_num_layers: int = 3
  mask_feat_stride: int = 8
  mask_stride: int = 4

  def __post_init__(self):
    for name, allowed in (('k_mode', K_MODES), ('k_interp', K_INTERPS),
                          ('k_area', K_AREAS), ('box_score', BOX_SCORES),
                          ('fusion', FUSIONS), ('mqs', MQS_MODES),
                          ('class_filter', CLASS_FILTERS)):
      if getattr(self, name) not in allowed:
        raise ValueError(f'qam.{name}={getattr(self, name)!r}: expected one '
                         f'of {allowed}')
    if not 1 <= self.k_min <= self.k_max or self.k < 1:
      raise ValueError(f'qam: need 1 <= k_min <= k_max and k >= 1, got '
                       f'k_min={self.k_min}, k_max={self.k_max}, k={self.k}')
    if not 0 < self.k_small < self.k_large:
      raise ValueError(f'qam: need 0 < k_small < k_large, got '
                       f'{self.k_small}, {self.k_large}')

  @property
  def max_k(self) -> int:
    """Static candidates per GT: the `[N, max_k]` gather."""
    return self.k if self.k_mode == 'fixed' else self.k_max

  @property
  def per_candidate_maps(self) -> bool:
    """Whether every candidate's map is needed on the student grid."""
    return self.fusion == 'vote' or self.mqs == 'code'


def num_selected_per_gt(gt_boxes: jnp.ndarray,
                        scale: jnp.ndarray | None = None, *,
                        mode: str = 'adaptive', k: int = 20,
                        k_min: int = 2, k_max: int = 10,
                        small: float = 32.0, large: float = 96.0,
                        interp: str = 'sqrt') -> jnp.ndarray:
  """K of each GT (paper Eq. 4, §4B.1), `[N]` int32.

  `K = k_min` for GTs of side `sqrt(area) <= small`, `k_max` for side
  `>= large`, linear in between (in the side for `interp="sqrt"`, in the
  area for `"area"`), rounded half up. `mode="fixed"`: `k` for every GT.

  Args:
    gt_boxes: `[N, 4]` xyxy on the student canvas.
    scale: `[2]` (sy, sx) = resized / original: areas are measured in
      original-image pixels; None: in the boxes' own pixels.
    mode: `adaptive` or `fixed`.
    k: fixed K.
    k_min: smallest adaptive K.
    k_max: largest adaptive K.
    small: side of `k_min`.
    large: side of `k_max`.
    interp: `sqrt` or `area`.
  """
  num = gt_boxes.shape[0]
  if mode == 'fixed':
    return jnp.full((num,), k, jnp.int32)
  b = gt_boxes.astype(jnp.float32)
  w = jnp.maximum(b[:, 2] - b[:, 0], 0.0)
  h = jnp.maximum(b[:, 3] - b[:, 1], 0.0)
  if scale is not None:
    scale = jnp.asarray(scale, jnp.float32)
    w, h = w / scale[1], h / scale[0]
  area = w * h
  if interp == 'sqrt':
    t = (jnp.sqrt(area) - small) / (large - small)
  else:
    t = (area - small ** 2) / (large ** 2 - small ** 2)
  value = k_min + (k_max - k_min) * jnp.clip(t, 0.0, 1.0)
  return jnp.floor(value + 0.5).astype(jnp.int32)


def box_quality_ranking(gt_boxes: jnp.ndarray, gt_labels: jnp.ndarray,
                        gt_valid: jnp.ndarray, num_per_gt: jnp.ndarray,
                        cand_boxes: jnp.ndarray, cand_labels: jnp.ndarray,
                        cand_valid: jnp.ndarray, *, max_k: int,
                        min_iou: float = 0.5, class_agnostic: bool = False,
                        class_filter: str = 'before_cut'
                        ) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
  """Box-Quality Ranking of one image (§4B.1, §4C.2 step 3).

  Per GT, the `max_k` valid candidates of highest IoU with its box (ties:
  lower candidate index first), of which the first `num_per_gt` are kept
  if their IoU exceeds `min_iou` and (unless `class_agnostic`) their class
  is the GT's. A candidate may serve several GTs. The box score plays no
  part: a better-scored candidate with a lower IoU ranks lower.

  The class filter runs before the cut (`class_filter="before_cut"`: only
  the GT's class is ranked) or after it (`"after_cut"`, the code). The
  candidates are one per (location, class), so one location's box comes
  once per class that passes the score threshold, with the same IoU: with
  a small K (adaptive K gives 2 to small objects) the cut can be filled
  with wrong-class copies of the best boxes, and the GT gets no pseudo
  mask (benchmarks/pseudo_label_audit.py; docs/methods.md).

  Args:
    gt_boxes: `[N, 4]` GT boxes.
    gt_labels: `[N]` int GT classes.
    gt_valid: `[N]` bool.
    num_per_gt: `[N]` int, K of each GT (<= `max_k`).
    cand_boxes: `[M, 4]` candidate boxes in the GTs' coordinates.
    cand_labels: `[M]` int candidate classes.
    cand_valid: `[M]` bool.
    max_k: static candidates per GT.
    min_iou: strict IoU threshold after the cut.
    class_agnostic: skip the class filter.
    class_filter: `after_cut` or `before_cut`.

  Returns:
    `(index [N, max_k] int32, iou [N, max_k], keep [N, max_k] bool)`, in
    descending IoU order per GT.
  """
  ious = box_ops.pairwise_iou(gt_boxes.astype(jnp.float32),
                              cand_boxes.astype(jnp.float32))  # [N, M]
  rankable = cand_valid[None, :]
  if class_filter == 'before_cut' and not class_agnostic:
    rankable = rankable & (cand_labels[None, :] == gt_labels[:, None])
  elif class_filter not in CLASS_FILTERS:
    raise ValueError(f'class_filter={class_filter!r}: expected one of '
                     f'{CLASS_FILTERS}')
  key = jnp.where(rankable, ious, -1.0)
  num_cand = cand_boxes.shape[0]
  k = min(max_k, num_cand)
  iou, idx = topk.top_k(key, k)
  if k < max_k:  # fewer candidates than slots: pad with invalid ones
    pad = ((0, 0), (0, max_k - k))
    iou = jnp.pad(iou, pad, constant_values=-1.0)
    idx = jnp.pad(idx, pad)
  rank = jnp.arange(max_k, dtype=jnp.int32)[None, :]
  keep = ((rank < num_per_gt[:, None]) & (iou > min_iou) &
          cand_valid[idx] & (iou >= 0) & gt_valid[:, None])
  if not class_agnostic:
    keep = keep & (cand_labels[idx] == gt_labels[:, None])
  return idx.astype(jnp.int32), jnp.maximum(iou, 0.0), keep


def fusion_weights(box_scores: jnp.ndarray, ious: jnp.ndarray,
                   keep: jnp.ndarray, *, tau: float = 0.1,
                   fusion: str = 'weighted'
                   ) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Normalised fusion weights of each GT's candidates (§4B.2).

  `weighted`: `w̃ = sqrt(b IoU) · 1[b > τ]`; `mean` and `vote`: `1[b > τ]`;
  `top1`: 1 for the first (highest-IoU) candidate with `b > τ`. Only kept
  candidates count; `w = w̃ / Σ w̃`, all zero when `Σ w̃ = 0`.

  Args:
    box_scores: `[N, K]` box scores `b` of the selected candidates.
    ious: `[N, K]` their IoU with the GT box.
    keep: `[N, K]` bool, Box-Quality Ranking's selection.
    tau: score threshold of the indicator.
    fusion: `weighted`, `mean`, `vote` or `top1`.

  Returns:
    `(weights [N, K], used [N, K] bool)`, `used = weights > 0`.
  """
  b = box_scores.astype(jnp.float32)
  ok = (keep & (b > tau)).astype(jnp.float32)
  if fusion == 'weighted':
    raw = jnp.sqrt(jnp.maximum(b * ious.astype(jnp.float32), 0.0)) * ok
  elif fusion in ('mean', 'vote'):
    raw = ok
  elif fusion == 'top1':
    first = jnp.argmax(ok, axis=-1)
    raw = jax.nn.one_hot(first, ok.shape[-1]) * ok.max(-1, keepdims=True)
  else:
    raise ValueError(f'qam.fusion={fusion!r}: expected one of {FUSIONS}')
  total = raw.sum(-1, keepdims=True)
  weights = jnp.where(total > 0, raw / jnp.where(total > 0, total, 1.0), 0.0)
  return weights, weights > 0


def fuse_masks(probs: jnp.ndarray, weights: jnp.ndarray, *,
               fusion: str = 'weighted', threshold: float = 0.5
               ) -> jnp.ndarray:
  """Soft fused map of each GT, `[N, K, h, w] -> [N, h, w]`.

  Linear fusions: `Σ_k w_k P_k`. `vote`: the fraction of used candidates
  with `P_k > threshold` (`weights` = 1/n on the used ones).
  """
  x = probs.astype(jnp.float32)
  if fusion == 'vote':
    x = (x > threshold).astype(jnp.float32)
  return jnp.einsum('nk,nkhw->nhw', weights, x)


def binarise(soft: jnp.ndarray, box_masks: jnp.ndarray, *,
             fusion: str = 'weighted', threshold: float = 0.5
             ) -> jnp.ndarray:
  """Pseudo masks: the fused map clipped to the GT box, binarised.

  Linear fusions: `M > threshold`; `vote`: vote fraction `> 0.5`, strict,
  so an even tie is background (the code). `[N, h, w]` bool.
  """
  thresh = 0.5 if fusion == 'vote' else threshold
  return (soft > thresh) & (box_masks > 0)


def mqs_paper(soft: jnp.ndarray, box_masks: jnp.ndarray,
              mean_box_score: jnp.ndarray, *, threshold: float = 0.5
              ) -> jnp.ndarray:
  """Mask-Quality Score of the paper (§4B.3), `[N]`.

  `s = sqrt(b̄ · mean_{p in box, M(p) > threshold} M(p))`, 0 when no pixel
  of the box passes.

  Args:
    soft: `[N, h, w]` fused maps `M`.
    box_masks: `[N, h, w]` GT box masks.
    mean_box_score: `[N]` mean box score `b̄` of the used candidates.
    threshold: τ_m (0.5).
  """
  inside = ((soft > threshold) & (box_masks > 0)).astype(jnp.float32)
  count = inside.sum((-2, -1))
  mean_fg = (soft * inside).sum((-2, -1)) / jnp.maximum(count, 1.0)
  return jnp.where(count > 0, jnp.sqrt(mean_box_score * mean_fg), 0.0)


def mqs_code(probs: jnp.ndarray, fused: jnp.ndarray, box_scores: jnp.ndarray,
             used: jnp.ndarray, *, threshold: float = 0.5) -> jnp.ndarray:
  """Mask-Quality Score of the public code (§4C.4), `[N]`.

  With `B_k = 1[P_k > threshold]` and `V` the fused binary mask (whole
  image, not clipped to the box): `IoU_k = |B_k ∧ V| / max(|B_k ∨ V|, 1)`,
  `a_k = Σ(P_k B_k) IoU_k / max(|V|, 1)`, `s = mean_{k used}
  sqrt((1 + b_k)/2 · a_k)`.

  Args:
    probs: `[N, K, h, w]` candidate maps (zero outside the image).
    fused: `[N, h, w]` bool `V`.
    box_scores: `[N, K]` `b_k`.
    used: `[N, K]` bool.
    threshold: θ (0.5).
  """
  p = probs.astype(jnp.float32)
  bk = p > threshold
  v = fused[:, None]
  inter = (bk & v).sum((-2, -1)).astype(jnp.float32)
  union = (bk | v).sum((-2, -1)).astype(jnp.float32)
  iou = inter / jnp.maximum(union, 1.0)
  v_area = fused.sum((-2, -1)).astype(jnp.float32)[:, None]
  a = (p * bk).sum((-2, -1)) * iou / jnp.maximum(v_area, 1.0)
  per = jnp.sqrt((1.0 + box_scores.astype(jnp.float32)) / 2.0 * a)
  uf = used.astype(jnp.float32)
  return (per * uf).sum(-1) / jnp.maximum(uf.sum(-1), 1.0)


def candidate_box_scores(outputs: dict, cand: dict, box_score: str
                         ) -> jnp.ndarray:
  """`[M]` box score `b` of each candidate (§4C.8 row 7).

  `cls`: `σ(cls)` of the candidate's class at its location; `fcos`:
  `c = sqrt(σ(cls) σ(ctr))` (the candidates' `scores`).
  """
  if box_score == 'fcos':
    return cand['scores']
  logits = outputs['cls_logits'][cand['location_index'], cand['labels']]
  return jax.nn.sigmoid(logits.astype(jnp.float32))


def pseudo_labels_one(outputs: dict, student_valid: jnp.ndarray,
                      teacher_valid: jnp.ndarray, gt_boxes: jnp.ndarray,
                      gt_labels: jnp.ndarray, gt_valid: jnp.ndarray,
                      scale: jnp.ndarray,
                      cfg: QAMConfig = QAMConfig()) -> dict:
  """QAM pseudo masks and flags of one image's GTs.

  Args:
    outputs: the teacher's network outputs for the image (`cls_logits
      [L, C]`, `reg [L, 4]`, `ctrness [L]`, `controller [L, P]`,
      `mask_feats [Ht/8, Wt/8, Cm]`).
    student_valid: `[H, W]` student canvas validity.
    teacher_valid: `[Ht, Wt]` teacher canvas validity.
    gt_boxes: `[N, 4]` GT boxes on the student canvas.
    gt_labels: `[N]` int GT classes.
    gt_valid: `[N]` bool.
    scale: `[2]` (sy, sx) resized / original size of the student view.
    cfg: settings.

  Returns:
    dict: `pseudo_masks [N, H/s, W/s]` float32 in {0, 1} (clipped to the
    box), `pseudo_flags [N]` (0 = no pseudo mask), `pseudo_scores [N]`
    (mean box score of the fused candidates, the code's `pred_scores` that
    PC's bank admission reads; 0 = none), `soft_masks [N, H/s,
    W/s]` (the fused maps before clipping), `has [N]` bool,
    `num_used [N]` (candidates fused per GT), `num_detections` (valid
    candidates of the image).
  """
  s = cfg.mask_stride
  canvas_t = teacher_valid.shape
  cand = detections.fcos_candidates(
      outputs, canvas_t, score_thresh=cfg.score_thresh,
      pre_nms_topk=cfg.pre_nms_topk, thresh_with_ctr=cfg.thresh_with_ctr)
  hs, ws = resample.valid_extent(student_valid)
  ht, wt = resample.valid_extent(teacher_valid)
  sx = ws.astype(jnp.float32) / jnp.maximum(wt, 1).astype(jnp.float32)
  sy = hs.astype(jnp.float32) / jnp.maximum(ht, 1).astype(jnp.float32)
  cand_boxes = cand['boxes'] * jnp.stack([sx, sy, sx, sy])
  box_scores = candidate_box_scores(outputs, cand, cfg.box_score)

  # Box-Quality Ranking and the fusion weights.
  num_per_gt = num_selected_per_gt(
      gt_boxes, scale if cfg.k_area == 'original' else None,
      mode=cfg.k_mode, k=cfg.k, k_min=cfg.k_min, k_max=cfg.k_max,
      small=cfg.k_small, large=cfg.k_large, interp=cfg.k_interp)
  idx, ious, keep = box_quality_ranking(
      gt_boxes, gt_labels, gt_valid, num_per_gt, cand_boxes, cand['labels'],
      cand['valid'], max_k=cfg.max_k, min_iou=cfg.min_iou,
      class_agnostic=cfg.class_agnostic, class_filter=cfg.class_filter)
  sel_scores = box_scores[idx]
  weights, used = fusion_weights(sel_scores, ious, keep, tau=cfg.tau,
                                 fusion=cfg.fusion)

  # The dynamic head on the N x K selected candidates, teacher grid.
  num_gt, max_k = idx.shape
  loc = cand['location_index'][idx].reshape(-1)
  locs = fcos_locations(canvas_t[0], canvas_t[1])
  logits = dynamic_mask_logits(
      outputs['mask_feats'], outputs['controller'][loc],
      jnp.asarray(locs.points)[loc],
      mask_head_soi(jnp.asarray(locs.levels)[loc], cfg.sizes_of_interest),
      mask_feat_stride=cfg.mask_feat_stride, mask_out_stride=s,
      channels=cfg.mask_head_channels, num_layers=cfg.mask_head_num_layers)
  probs_t = jax.nn.sigmoid(logits) * used.reshape(-1)[:, None, None]

  # Teacher grid -> the student's stride-4 sample points (§4.2 chain).
  height, width = student_valid.shape
  rows = resample.grid_resample_matrix(height // s, logits.shape[-2], hs, ht,
                                       s)
  cols = resample.grid_resample_matrix(width // s, logits.shape[-1], ws, wt,
                                       s)
  region = student_valid[s // 2::s, s // 2::s].astype(jnp.float32)
  grid = region.shape
  probs = None
  if cfg.per_candidate_maps:
    probs = resample.resample_masks(probs_t, rows, cols).reshape(
        (num_gt, max_k) + grid) * region
    soft = fuse_masks(probs, weights, fusion=cfg.fusion,
                      threshold=cfg.mask_threshold)
  else:
    fused_t = fuse_masks(probs_t.reshape((num_gt, max_k) + probs_t.shape[1:]),
                         weights, fusion=cfg.fusion)
    soft = resample.resample_masks(fused_t, rows, cols) * region

  has = used.any(-1) & gt_valid
  box_masks = boxinst.box_masks_at_stride(gt_boxes, grid, s)
  thresh = 0.5 if cfg.fusion == 'vote' else cfg.mask_threshold
  masks = binarise(soft, box_masks, fusion=cfg.fusion,
                   threshold=cfg.mask_threshold) & has[:, None, None]
  used_f = used.astype(jnp.float32)
  mean_b = (sel_scores * used_f).sum(-1) / jnp.maximum(used_f.sum(-1), 1.0)
  if cfg.mqs == 'paper':
    flags = mqs_paper(soft, box_masks, mean_b, threshold=cfg.mask_threshold)
  elif cfg.mqs == 'code':
    flags = mqs_code(probs, soft > thresh, sel_scores, used,
                     threshold=cfg.mask_threshold)
  else:
    flags, _ = boxteacher.mask_aware_scores(mean_b, soft, region,
                                            cfg.mask_threshold)
  flags = jnp.where(has, flags, 0.0)
  return {'pseudo_masks': jax.lax.stop_gradient(masks.astype(jnp.float32)),
          'pseudo_flags': jax.lax.stop_gradient(flags),
          'pseudo_scores': jax.lax.stop_gradient(jnp.where(has, mean_b, 0.0)),
          'soft_masks': jax.lax.stop_gradient(soft),
          'has': has,
          'num_used': used_f.sum(-1),
          'num_detections': cand['valid'].sum().astype(jnp.float32)}


def pseudo_labels(outputs: dict, batch: dict, teacher_valid: jnp.ndarray,
                  cfg: QAMConfig = QAMConfig()) -> tuple[dict, dict]:
  """`pseudo_labels_one` over the batch, plus honesty metrics.

  Args:
    outputs: the teacher's batched network outputs (`[B, ...]`), before
      any NMS.
    batch: the batch contract (`image_valid`, `boxes`, `labels`,
      `instance_valid`, `example_valid`, `scale`; optional `monitor_masks`).
    teacher_valid: `[B, Ht, Wt]` teacher canvas validity.
    cfg: settings.

  Returns:
    `(labels, metrics)`: `labels` = `pseudo_masks [B, N, H/s, W/s]`,
    `pseudo_flags [B, N]` and `pseudo_scores [B, N]`; `metrics` =
    BoxTeacher's honesty metrics
    (`boxteacher.label_metrics`; `teacher_detections` counts the valid
    pre-NMS candidates per image) and `qam_candidates_per_gt` (mean number
    of fused candidates over GTs with a pseudo mask).
  """
  if cfg.k_area == 'original' and 'scale' not in batch:
    raise ValueError("qam.k_area='original' needs the batch's 'scale' "
                     "(resized / original size)")
  gt_valid = batch['instance_valid'] & batch['example_valid'][:, None]
  scale = batch.get('scale')
  if scale is None:
    scale = jnp.ones(gt_valid.shape[:1] + (2,), jnp.float32)
  out = jax.vmap(lambda o, sv, tv, b, l, g, sc: pseudo_labels_one(
      o, sv, tv, b, l, g, sc, cfg))(
          outputs, batch['image_valid'], teacher_valid, batch['boxes'],
          batch['labels'], gt_valid, scale)
  metrics = boxteacher.label_metrics(
      out['has'], out['pseudo_flags'], out['pseudo_masks'], gt_valid,
      out['num_detections'], batch)
  has_f = (out['has'] & gt_valid).astype(jnp.float32)
  metrics['qam_candidates_per_gt'] = jax.lax.stop_gradient(
      (out['num_used'] * has_f).sum() / jnp.maximum(has_f.sum(), 1.0))
  labels = {'pseudo_masks': out['pseudo_masks'],
            'pseudo_flags': out['pseudo_flags'],
            'pseudo_scores': out['pseudo_scores']}
  return labels, metrics
