"""BoxTeacher's pseudo labels: teacher detections -> per-GT masks and flags.

Pure jnp, one image at a time (vmapped by the train step), static shapes:

1. the teacher's detections (`ops.detections.detect` at test thresholds,
   <= D = 100, stride-4 mask probabilities on the teacher canvas);
2. their masks resampled onto the student's stride-4 grid, the teacher's
   boxes mapped into the student view and clipped to it (§4.2);
3. the mask-aware scores (§4.3): `m̄` = mean probability of the predicted
   foreground, `mask_score = c^{1/4} m̄^{1/2}` (the loss weight) and
   `score = sqrt(c m̄)` (the assignment order);
4. the box-based assignment (§4.4): detections visited by `score`,
   descending; each takes, among the GTs not yet matched with IoU >= 0.5,
   the one of highest IoU (ties: the later GT). `assign_quirk=True`
   reproduces the reference's off-by-one: a GT matched to detection 0 (the
   first in NMS order) still counts as unmatched;
5. per GT: the matched detection's binary mask on the student grid and its
   `mask_score` as the flag (0 = no pseudo mask).

Where the reference computes `m̄` on the mask pasted to the student's full
resolution, we average over the student's stride-4 sample points inside the
image: the same mean, estimated on a 4x coarser grid (docs/methods.md).
"""

import dataclasses

import jax
import jax.numpy as jnp

from boxseg_jax.ops import boxes as box_ops
from boxseg_jax.ops import resample


@dataclasses.dataclass(frozen=True)
class PseudoLabelConfig:
  """Static settings of BoxTeacher's pseudo labels (config.boxteacher)."""
  iou_thresh: float = 0.5
  score_thresh: float = 0.0
  assign_quirk: bool = False
  mask_threshold: float = 0.5
  mask_stride: int = 4


def mask_aware_scores(fcos_scores: jnp.ndarray, probs: jnp.ndarray,
                      region: jnp.ndarray, threshold: float = 0.5
                      ) -> tuple[jnp.ndarray, jnp.ndarray]:
  """`(mask_score, score)` of detections (reference §4.3).

  Args:
    fcos_scores: `[D]` `c = sqrt(σ(cls) σ(ctr))`.
    probs: `[D, h, w]` mask probabilities.
    region: `[h, w]` where the pasted mask exists (the image).
    threshold: `M = 1[P > threshold]`.

  Returns:
    `mask_score = sqrt(sqrt(c) m̄)` and `score = sqrt(c m̄)`, each `[D]`,
    with `m̄ = Σ(P M) / (Σ M + 1e-6)`.
  """
  p = probs * region.astype(jnp.float32)
  m = (p > threshold).astype(jnp.float32)
  mean_fg = (p * m).sum((-2, -1)) / (m.sum((-2, -1)) + 1e-6)
  c = fcos_scores.astype(jnp.float32)
  return jnp.sqrt(jnp.sqrt(c) * mean_fg), jnp.sqrt(c * mean_fg)


def assign(det_boxes: jnp.ndarray, det_scores: jnp.ndarray,
           det_valid: jnp.ndarray, gt_boxes: jnp.ndarray,
           gt_valid: jnp.ndarray, *, iou_thresh: float = 0.5,
           score_thresh: float = 0.0, quirk: bool = False) -> jnp.ndarray:
  """Greedy box-based pseudo-mask assignment of one image (reference §4.4).

  Args:
    det_boxes: `[D, 4]` teacher boxes in the GT's coordinates.
    det_scores: `[D]` ranking scores (`sqrt(c m̄)`).
    det_valid: `[D]` bool.
    gt_boxes: `[N, 4]`.
    gt_valid: `[N]` bool.
    iou_thresh: minimum IoU (0.5).
    score_thresh: detections below it are skipped (0.0).
    quirk: reproduce the reference's `gtm[j] > 0` test.

  Returns:
    `[N]` int32: the matched detection index (NMS order), -1 for none.
  """
  num_gt = gt_boxes.shape[0]
  ious = box_ops.pairwise_iou(det_boxes.astype(jnp.float32),
                              gt_boxes.astype(jnp.float32))  # [D, N]
  key = jnp.where(det_valid, det_scores.astype(jnp.float32), -jnp.inf)
  order = jnp.argsort(-key, stable=True)
  reverse = jnp.arange(num_gt - 1, -1, -1)

  def visit(match, i):
    taken = match > 0 if quirk else match >= 0
    ok = det_valid[i] & (det_scores[i] >= score_thresh)
    cand = gt_valid & ~taken & (ious[i] >= iou_thresh) & ok
    # argmax over the reversed candidates: ties go to the higher GT index.
    masked = jnp.where(cand, ious[i], -1.0)
    j = reverse[jnp.argmax(masked[reverse])]
    match = jnp.where(cand[j], match.at[j].set(i), match)
    return match, None

  match, _ = jax.lax.scan(visit, jnp.full((num_gt,), -1, jnp.int32),
                          order.astype(jnp.int32))
  return match


def teacher_to_student(dets: dict, student_valid: jnp.ndarray,
                       teacher_valid: jnp.ndarray, stride: int = 4
                       ) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
  """One image's teacher detections in the student's view.

  Args:
    dets: `detect` output of the teacher (`boxes [D, 4]` on the teacher
      canvas, `valid [D]`, `mask_probs [D, Ht/s, Wt/s]`).
    student_valid: `[H, W]` student canvas validity.
    teacher_valid: `[Ht, Wt]` teacher canvas validity.
    stride: mask grid stride.

  Returns:
    `(boxes [D, 4], valid [D], probs [D, H/s, W/s])`: boxes scaled to the
    student's resized image and clipped to it (empty boxes invalid), mask
    probabilities on the student grid (zero outside the image).
  """
  hs, ws = resample.valid_extent(student_valid)
  ht, wt = resample.valid_extent(teacher_valid)
  height, width = student_valid.shape
  probs = dets['mask_probs']
  rows = resample.grid_resample_matrix(height // stride, probs.shape[-2], hs,
                                       ht, stride)
  cols = resample.grid_resample_matrix(width // stride, probs.shape[-1], ws,
                                       wt, stride)
  student_probs = resample.resample_masks(probs, rows, cols)
  sx = ws.astype(jnp.float32) / jnp.maximum(wt, 1).astype(jnp.float32)
  sy = hs.astype(jnp.float32) / jnp.maximum(ht, 1).astype(jnp.float32)
  boxes = dets['boxes'].astype(jnp.float32) * jnp.stack([sx, sy, sx, sy])
  hi = jnp.stack([ws, hs, ws, hs]).astype(jnp.float32)
  boxes = jnp.clip(boxes, 0.0, hi)
  nonempty = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
  return boxes, dets['valid'] & nonempty, student_probs


def pseudo_labels_one(dets: dict, student_valid: jnp.ndarray,
                      teacher_valid: jnp.ndarray, gt_boxes: jnp.ndarray,
                      gt_valid: jnp.ndarray,
                      cfg: PseudoLabelConfig = PseudoLabelConfig()) -> dict:
  """Pseudo masks and flags of one image's GTs.

  Args:
    dets: the teacher's `detect` output for the image (with `mask_probs`).
    student_valid: `[H, W]` student canvas validity.
    teacher_valid: `[Ht, Wt]` teacher canvas validity.
    gt_boxes: `[N, 4]` GT boxes on the student canvas.
    gt_valid: `[N]` bool.
    cfg: settings.

  Returns:
    dict: `pseudo_masks [N, H/s, W/s]` float32 in {0, 1}, `pseudo_flags
    [N]` (mask score of the match, 0 = none), `pseudo_scores [N]` (the
    match's `c`, read by PC's bank admission; 0 = none), `match [N]` int32
    (-1 = none), `num_detections` scalar.
  """
  s = cfg.mask_stride
  boxes, valid, probs = teacher_to_student(dets, student_valid,
                                           teacher_valid, s)
  region = student_valid[s // 2::s, s // 2::s]
  mask_score, score = mask_aware_scores(dets['scores'], probs, region,
                                        cfg.mask_threshold)
  match = assign(boxes, score, valid, gt_boxes, gt_valid,
                 iou_thresh=cfg.iou_thresh, score_thresh=cfg.score_thresh,
                 quirk=cfg.assign_quirk)
  has = match >= 0
  idx = jnp.maximum(match, 0)
  binary = ((probs * region.astype(jnp.float32)) > cfg.mask_threshold)
  masks = binary[idx].astype(jnp.float32) * has[:, None, None]
  flags = jnp.where(has, mask_score[idx], 0.0)
  det_scores = jnp.where(has, dets['scores'][idx].astype(jnp.float32), 0.0)
  return {'pseudo_masks': jax.lax.stop_gradient(masks),
          'pseudo_flags': jax.lax.stop_gradient(flags),
          'pseudo_scores': jax.lax.stop_gradient(det_scores),
          'match': match,
          'num_detections': valid.sum().astype(jnp.float32)}


def pseudo_labels(dets: dict, batch: dict, teacher_valid: jnp.ndarray,
                  cfg: PseudoLabelConfig = PseudoLabelConfig()
                  ) -> tuple[dict, dict]:
  """`pseudo_labels_one` over the batch, plus honesty metrics.

  Args:
    dets: the teacher's batched `detect` output (`[B, D, ...]`).
    batch: the batch contract (`image_valid`, `boxes`, `instance_valid`,
      `example_valid`; optional `monitor_masks [B, N, H/s, W/s]` GT masks
      that no loss reads).
    teacher_valid: `[B, Ht, Wt]` teacher canvas validity.
    cfg: settings.

  Returns:
    `(labels, metrics)`: `labels` = `pseudo_masks [B, N, H/s, W/s]`,
    `pseudo_flags [B, N]` and `pseudo_scores [B, N]`; `metrics` =
    `pseudo_fraction` (GTs with a pseudo
    mask), `pseudo_flag_mean` (mean flag over those), `teacher_detections`
    (per image) and, with `monitor_masks`, `pseudo_iou` (mean IoU of the
    pseudo masks with the GT masks, over GTs with a pseudo mask).
  """
  gt_valid = batch['instance_valid'] & batch['example_valid'][:, None]
  out = jax.vmap(lambda d, sv, tv, b, g: pseudo_labels_one(
      d, sv, tv, b, g, cfg))(dets, batch['image_valid'], teacher_valid,
                             batch['boxes'], gt_valid)
  metrics = label_metrics(out['match'] >= 0, out['pseudo_flags'],
                          out['pseudo_masks'], gt_valid,
                          out['num_detections'], batch)
  labels = {'pseudo_masks': out['pseudo_masks'],
            'pseudo_flags': out['pseudo_flags'],
            'pseudo_scores': out['pseudo_scores']}
  return labels, metrics


def label_metrics(has: jnp.ndarray, flags: jnp.ndarray, masks: jnp.ndarray,
                  gt_valid: jnp.ndarray, num_detections: jnp.ndarray,
                  batch: dict) -> dict:
  """The honesty metrics of a batch's pseudo labels (BoxTeacher, QAM).

  Args:
    has: `[B, N]` bool, GTs given a pseudo mask.
    flags: `[B, N]` their flags.
    masks: `[B, N, h, w]` the pseudo masks.
    gt_valid: `[B, N]` bool, valid GTs of valid examples.
    num_detections: `[B]` teacher detections (or candidates) per image.
    batch: the batch; its optional `monitor_masks [B, N, h, w]` (GT masks
      no loss reads) give `pseudo_iou`.

  Returns:
    `pseudo_fraction` (GTs with a pseudo mask), `pseudo_flag_mean` (mean
    flag over those), `teacher_detections` (per image) and, with
    `monitor_masks`, `pseudo_iou` (mean IoU of the pseudo masks with the GT
    masks over GTs with a pseudo mask), all without gradient.
  """
  has_f = (has & gt_valid).astype(jnp.float32)
  num_has = jnp.maximum(has_f.sum(), 1.0)
  metrics = {
      'pseudo_fraction': has_f.sum() / jnp.maximum(
          gt_valid.astype(jnp.float32).sum(), 1.0),
      'pseudo_flag_mean': (flags * has_f).sum() / num_has,
      'teacher_detections': num_detections.astype(jnp.float32).mean(),
  }
  if 'monitor_masks' in batch:
    gt = batch['monitor_masks'].astype(jnp.float32)
    pm = masks.astype(jnp.float32)
    inter = (gt * pm).sum((-2, -1))
    union = jnp.maximum(gt, pm).sum((-2, -1))
    iou = inter / jnp.maximum(union, 1.0)
    metrics['pseudo_iou'] = (iou * has_f).sum() / num_has
  return jax.lax.stop_gradient(metrics)
