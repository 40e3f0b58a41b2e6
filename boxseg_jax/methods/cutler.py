"""CutLER's training pieces on CondInst: DropLoss and copy-paste.

Pure jnp, static shapes, run inside the one jitted train step of the
`cutler` method (reference §6; docs/cutler.md). The method trains CondInst
fully supervised (dice, §2.5) on class-agnostic pseudo masks (MaskCut's, then
each self-training round's), so the batch carries `masks [B, N, h, w]` on
the stride-4 grid like every mask-supervised batch.

**DropLoss** (§6.1, CondInst adaptation): per FCOS location, the box decoded
from the current regression (stop-gradient) and `u = max_g IoU(box, g)` over
the image's boxes; a negative location's focal loss is kept iff `u > τ`
(0.01), a positive keeps weight 1, the normaliser `num_pos_avg` is
unchanged (`droploss_weights`, fed to `fcos_losses`' `cls_location_weight`).

**Copy-paste** (§6.3, `CustomSimpleTrainer.copy_and_paste`), per image, the
donor being the same device's batch reversed (`copy_paste`):

1. with probability `rate`, and when the donor has `n > 0` objects, copy
   `num_copy` of them chosen without replacement: `1` if `n = 1`, else
   uniform in `[1, n - 1]` (the reference's `randint(1, n)`; never all of
   them), or all `n` with `random_num=False`;
2. `r ~ U[min_ratio, max_ratio]`; the donor's whole image (its valid
   region) is resized bilinearly (`align_corners=False`, truncated to uint8
   as `.byte()`) to `(int(r h_t), int(r w_t))` of the *target's* image size
   and placed at an offset uniform in `[0, h_t - int(r h_t)]` x `[0, w_t -
   int(r w_t)]`; the chosen masks follow on the stride-4 grid;
3. a copy is kept iff its max `ioy = |copy ∩ existing| / |existing|` over
   the target's objects is `< 0.5`; none kept: the target is unchanged;
   existing masks are occluded by the union of the kept copies, objects
   left empty are removed, the image (and the colour-similarity view) takes
   the donor's pixels under the union, boxes are recomputed from masks;
4. a target without objects takes the copies as its only objects
   (`swap_xy_quirk=True` reproduces the reference's box offsets with x and y
   swapped in that branch, a bug, off by default).

**On the grid** [decision]: a copy's grid cell is on where the bilinear
interpolation of the donor's grid mask at the cell's source position is
`>= 0.5` (the reference's `> 0` after a full-resolution bilinear resize
dilates by at most one pixel; `> 0` on a stride-4 grid would dilate by up to
four); the composite reads the grid masks upsampled by blocks
(`ops/grid_masks.py`, shared with BoxSeg's PC), so image, mask and box
describe one mask. A recomputed box is the block box of the grid mask
clipped to the object's previous box (occlusion only removes pixels; an
untouched object keeps its exact box), a copy's the block box clipped to the
donor's box scaled and shifted with the image. The instance list keeps its
`N` rows: kept copies fill the rows that were free before the paste (copies
beyond them are not pasted and counted as `cp_no_room`).
"""

import dataclasses

import jax
import jax.numpy as jnp

from boxseg_jax.ops import boxes as box_ops
from boxseg_jax.ops import grid_masks as gmask
from boxseg_jax.ops import resample

# Batch fields copy-paste reads; it writes the image views and instances.
COPY_PASTE_KEYS = ('image', 'image_teacher', 'image_valid', 'boxes',
                   'labels', 'instance_valid', 'example_valid', 'masks')


@dataclasses.dataclass(frozen=True)
class CopyPasteConfig:
  """Static settings of CutLER's copy-paste (`config.cutler.copy_paste_*`).

  Attributes:
    rate: probability that an image receives a paste (`COPY_PASTE_RATE`).
    random_num: random number of copies (`COPY_PASTE_RANDOM_NUM`); False
      copies every donor object.
    min_ratio: lower bound of the resize ratio (0.3 round 0, 0.5 later).
    max_ratio: upper bound (1.0).
    ioy_thresh: a copy is kept iff its max ioy over existing objects is
      below it (0.5).
    swap_xy_quirk: the reference's swapped box offsets for targets without
      objects.
    mask_stride: stride of the mask grid (4).
  """
  rate: float = 1.0
  random_num: bool = True
  min_ratio: float = 0.3
  max_ratio: float = 1.0
  ioy_thresh: float = 0.5
  swap_xy_quirk: bool = False
  mask_stride: int = 4

  def __post_init__(self):
    if not 0.0 < self.min_ratio <= self.max_ratio <= 1.0:
      raise ValueError(f'cutler copy-paste ratios [{self.min_ratio}, '
                       f'{self.max_ratio}]: need 0 < min <= max <= 1')


# ------------------------------------------------------------------ DropLoss


def droploss_weights(reg: jnp.ndarray, points: jnp.ndarray,
                     strides: jnp.ndarray, boxes: jnp.ndarray,
                     instance_valid: jnp.ndarray, positive: jnp.ndarray,
                     *, iou_thresh: float = 0.01) -> jnp.ndarray:
  """DropLoss weights of the FCOS classification loss, `[B, L]` (detached).

  Args:
    reg: `[B, L, 4]` predicted (l, t, r, b) in stride units.
    points: `[L, 2]` location (x, y) pixels.
    strides: `[L]` stride of each location.
    boxes: `[B, N, 4]` xyxy boxes of the (pseudo) ground truth.
    instance_valid: `[B, N]` bool.
    positive: `[B, L]` bool FCOS positives.
    iou_thresh: τ; a negative is kept iff its max IoU is above it.

  Returns:
    `[B, L]` float32: 1 for positives, `1[max_g IoU(box, g) > τ]` for
    negatives (IoU 0 with every box when the image has none).
  """
  pred = box_ops.ltrb_to_xyxy(points, jax.lax.stop_gradient(
      reg.astype(jnp.float32)), strides)

  def one(p, b, v):
    ious = box_ops.pairwise_iou(p, b.astype(jnp.float32))
    return jnp.max(jnp.where(v[None, :], ious, 0.0), axis=1)

  u = jax.vmap(one)(pred, boxes, instance_valid)
  keep = positive | (u > iou_thresh)
  return jax.lax.stop_gradient(keep.astype(jnp.float32))


# ---------------------------------------------------------------- copy-paste


def resize_taps(out_len: int, start: jnp.ndarray, new_size: jnp.ndarray,
                src_size: jnp.ndarray, src_len: int, *, sample_stride: int = 1,
                src_stride: int = 1
                ) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray,
                           jnp.ndarray]:
  """One axis of a bilinear resize placed at an offset (torch's rule).

  Output index `o` is the target pixel `y = sample_stride * o +
  sample_stride // 2` (1: every pixel; 4: the mask grid's sample points).
  For `start <= y < start + new_size`, its source pixel coordinate is
  `max((y - start + 0.5) src_size / new_size - 0.5, 0)` (`align_corners=
  False`), read on a source of `src_len` samples of stride `src_stride`
  (sample `i` at pixel `src_stride * i + src_stride // 2`).

  Returns:
    `(lo [out], hi [out], frac [out], inside [out])`: taps, weight of `hi`
    and whether `y` lies in the placed region.
  """
  y = (jnp.arange(out_len, dtype=jnp.float32) * sample_stride +
       sample_stride // 2)
  start = jnp.asarray(start, jnp.float32)
  new_size = jnp.asarray(new_size, jnp.float32)
  src_size = jnp.asarray(src_size, jnp.float32)
  src = jnp.maximum((y - start + 0.5) * src_size / jnp.maximum(new_size, 1.0)
                    - 0.5, 0.0)
  g = jnp.maximum((src - src_stride // 2) / src_stride, 0.0)
  lo = jnp.minimum(jnp.floor(g), src_len - 1)
  frac = jnp.where(lo < src_len - 1, g - lo, 0.0)
  lo = lo.astype(jnp.int32)
  hi = jnp.minimum(lo + 1, src_len - 1)
  inside = (y >= start) & (y < start + new_size)
  return lo, hi, frac, inside


def _lerp(x: jnp.ndarray, taps, axis: int) -> jnp.ndarray:
  lo, hi, frac, _ = taps
  shape = [1] * x.ndim
  shape[axis] = frac.shape[0]
  f = frac.reshape(shape)
  return (jnp.take(x, lo, axis=axis) * (1.0 - f) +
          jnp.take(x, hi, axis=axis) * f)


def resize_image(image: jnp.ndarray, taps_y, taps_x) -> jnp.ndarray:
  """`[H, W, 3]` uint8 resized and placed (0 outside the region), uint8."""
  x = _lerp(_lerp(image.astype(jnp.float32), taps_y, 0), taps_x, 1)
  inside = taps_y[3][:, None] & taps_x[3][None, :]
  # torch's `.byte()` truncates.
  return jnp.where(inside[..., None], jnp.floor(x), 0.0).astype(jnp.uint8)


def resize_grid_masks(masks: jnp.ndarray, taps_y, taps_x) -> jnp.ndarray:
  """`[K, h, w]` grid masks resized and placed onto the target grid, bool."""
  x = _lerp(_lerp(masks.astype(jnp.float32), taps_y, 1), taps_x, 2)
  inside = taps_y[3][:, None] & taps_x[3][None, :]
  return (x >= 0.5) & inside[None]


def num_copies(key: jax.Array, num: jnp.ndarray, random_num: bool
               ) -> jnp.ndarray:
  """`num_copy` of a donor with `num` objects (§6.3 step 1)."""
  if not random_num:
    return num
  # randint(1, n) of NumPy: [1, n - 1]; one object: 1.
  draw = jax.random.randint(key, (), 1, jnp.maximum(num, 2))
  return jnp.where(num == 1, 1, draw)


def choose_without_replacement(key: jax.Array, valid: jnp.ndarray,
                               count: jnp.ndarray) -> jnp.ndarray:
  """`[N]` bool: `count` of the valid rows, uniformly without replacement."""
  prio = jnp.where(valid, jax.random.uniform(key, valid.shape), -1.0)
  rank = jnp.argsort(jnp.argsort(-prio))
  return valid & (rank < count)


def _clip_boxes(boxes: jnp.ndarray, limit: jnp.ndarray) -> jnp.ndarray:
  """Intersection of `[K, 4]` boxes with `limit` `[K, 4]`."""
  lo = jnp.maximum(boxes[:, :2], limit[:, :2])
  hi = jnp.maximum(jnp.minimum(boxes[:, 2:], limit[:, 2:]), lo)
  return jnp.concatenate([lo, hi], axis=-1)


def paste_one(target: dict, donor: dict, key: jax.Array,
              cfg: CopyPasteConfig) -> tuple[dict, dict]:
  """Copy-paste of one donor image onto one target image (§6.3).

  Args:
    target: `image`, `image_teacher` `[H, W, 3]` uint8, `image_valid [H,
      W]`, `boxes [N, 4]`, `labels [N]`, `instance_valid [N]`,
      `example_valid []`, `masks [N, H/s, W/s]` bool.
    donor: the same fields of the donor image.
    key: PRNG key of the target.
    cfg: settings.

  Returns:
    `(out, metrics)`: the target's fields after the paste (same shapes) and
    per-image scalars `cp_pasted`, `cp_copies`, `cp_rejected_ioy`,
    `cp_no_room`, `cp_targets_removed`.
  """
  s = cfg.mask_stride
  k_rate, k_num, k_choice, k_ratio, k_y, k_x = jax.random.split(key, 6)
  height, width = target['image_valid'].shape
  hg, wg = target['masks'].shape[-2:]
  num_rows = target['boxes'].shape[0]
  tv = target['instance_valid'] & target['example_valid']
  dv = donor['instance_valid'] & donor['example_valid']
  n_t, n_d = tv.sum(), dv.sum()
  h_t, w_t = resample.valid_extent(target['image_valid'])
  h_d, w_d = resample.valid_extent(donor['image_valid'])

  # Step 1: whether and what to copy.
  attempt = ((jax.random.uniform(k_rate) <= cfg.rate) & (n_d > 0) &
             target['example_valid'])
  chosen = choose_without_replacement(
      k_choice, dv, num_copies(k_num, n_d, cfg.random_num))

  # Step 2: ratio, size and offset (Python's int() and randint(a, b)).
  ratio = jax.random.uniform(k_ratio, (), minval=cfg.min_ratio,
                             maxval=cfg.max_ratio)
  h_new = jnp.floor(ratio * h_t).astype(jnp.int32)
  w_new = jnp.floor(ratio * w_t).astype(jnp.int32)
  dy = jax.random.randint(k_y, (), 0, h_t - h_new + 1)
  dx = jax.random.randint(k_x, (), 0, w_t - w_new + 1)
  img_y = resize_taps(height, dy, h_new, h_d, height)
  img_x = resize_taps(width, dx, w_new, w_d, width)
  grid_y = resize_taps(hg, dy, h_new, h_d, hg, sample_stride=s,
                       src_stride=s)
  grid_x = resize_taps(wg, dx, w_new, w_d, wg, sample_stride=s,
                       src_stride=s)
  region = target['image_valid'][s // 2::s, s // 2::s]
  copies = (resize_grid_masks(donor['masks'], grid_y, grid_x) &
            chosen[:, None, None] & region[None])
  copy_area = copies.sum((-2, -1))

  # Step 3: the ioy rule, then the rows free before the paste.
  exist = target['masks'].astype(bool) & tv[:, None, None]
  exist_area = exist.sum((-2, -1))
  inter = jnp.einsum('ihw,jhw->ij', copies.astype(jnp.float32),
                     exist.astype(jnp.float32))
  ioy = jnp.where((exist_area > 0)[None, :],
                  inter / jnp.maximum(exist_area, 1)[None, :], 0.0)
  low_ioy = ioy.max(axis=1) < cfg.ioy_thresh
  kept = chosen & (copy_area > 0) & low_ioy
  rank = jnp.cumsum(kept) - 1
  placed = kept & (rank < num_rows - n_t)
  pasted = attempt & placed.any()
  placed = placed & pasted
  union = (copies & placed[:, None, None]).any(0)
  cover, _, _ = gmask.block_upsample(union, jnp.zeros((2,), jnp.int32),
                                     target['image_valid'], s)

  def composite(view, donor_view):
    return jnp.where(cover[..., None],
                     resize_image(donor_view, img_y, img_x), view)

  # Occlusion; emptied objects leave; changed objects get new boxes.
  occluded = exist & ~union[None]
  area_after = occluded.sum((-2, -1))
  removed = tv & (exist_area > 0) & (area_after == 0)
  keep_t = tv & ~removed
  origin = jnp.zeros((2,), jnp.int32)
  grid_boxes = gmask.block_boxes(occluded, origin, (h_t, w_t), s)
  t_boxes = target['boxes'].astype(jnp.float32)
  changed = pasted & (area_after < exist_area)
  t_boxes = jnp.where(changed[:, None], _clip_boxes(grid_boxes, t_boxes),
                      t_boxes)

  # Copies: boxes from their masks, clipped to the moved donor box.
  sx = ratio * w_t / jnp.maximum(w_d, 1)
  sy = ratio * h_t / jnp.maximum(h_d, 1)
  scale = jnp.stack([sx, sy, sx, sy])
  moved = donor['boxes'].astype(jnp.float32) * scale + jnp.stack(
      [dx, dy, dx, dy]).astype(jnp.float32)
  c_boxes = _clip_boxes(gmask.block_boxes(copies, origin, (h_t, w_t), s),
                        moved)
  if cfg.swap_xy_quirk:
    swapped = donor['boxes'].astype(jnp.float32) * scale + jnp.stack(
        [dy, dx, dy, dx]).astype(jnp.float32)
    limit = jnp.stack([w_t, h_t, w_t, h_t]).astype(jnp.float32)
    swapped = jnp.clip(swapped, 0.0, limit)
    c_boxes = jnp.where(n_t == 0, swapped, c_boxes)

  # Kept copies fill the rows free before the paste, in donor order.
  free_first = jnp.argsort(tv, stable=True)          # free rows first
  pos_of_row = jnp.argsort(free_first)               # row -> position
  copy_order = jnp.argsort(~placed, stable=True)     # placed copies first
  src = copy_order[jnp.minimum(pos_of_row, num_rows - 1)]
  is_copy = ~tv & (pos_of_row < placed.sum())
  out = {
      'image': jnp.where(pasted, composite(target['image'], donor['image']),
                         target['image']),
      'image_teacher': jnp.where(
          pasted, composite(target['image_teacher'], donor['image_teacher']),
          target['image_teacher']),
      'boxes': jnp.where(is_copy[:, None], c_boxes[src],
                         jnp.where(keep_t[:, None], t_boxes, 0.0)),
      'labels': jnp.where(is_copy, donor['labels'][src],
                          jnp.where(keep_t, target['labels'], -1)).astype(
                              target['labels'].dtype),
      'instance_valid': jnp.where(pasted, keep_t | is_copy,
                                  target['instance_valid']),
      'masks': jnp.where(is_copy[:, None, None], copies[src],
                         jnp.where(pasted, occluded,
                                   target['masks'].astype(bool))
                         & keep_t[:, None, None]),
  }
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  tried = attempt & chosen.any()
  metrics = {
      'cp_pasted': f32(pasted),
      'cp_copies': f32(placed.sum()),
      'cp_rejected_ioy': f32((tried & chosen & (copy_area > 0) &
                              ~low_ioy).sum()),
      'cp_no_room': f32((attempt & kept & ~(rank < num_rows - n_t)).sum()),
      'cp_targets_removed': f32((removed & pasted).sum()),
  }
  return out, metrics


def reversed_per_device(x: jnp.ndarray, num_devices: int) -> jnp.ndarray:
  """The batch with each device's images in reverse order (the donors)."""
  size = x.shape[0]
  per = x.reshape((num_devices, size // num_devices) + x.shape[1:])
  return per[:, ::-1].reshape(x.shape)


def copy_paste(batch: dict, key: jax.Array, cfg: CopyPasteConfig, *,
               num_devices: int = 1) -> tuple[dict, dict]:
  """CutLER's copy-paste on a global batch, donors reversed per device.

  Device `d` holds rows `[d B/D, (d + 1) B/D)` of the global batch (the
  `data` sharding), and its image `i` takes image `B/D - 1 - i` of the same
  device as donor, as the reference does with each process' batch (an odd
  per-device batch pastes its middle image onto itself).

  Args:
    batch: the mask-supervised batch (`COPY_PASTE_KEYS`; others pass).
    key: PRNG key of the step.
    cfg: settings.
    num_devices: the `data` mesh size `D`.

  Returns:
    `(batch, metrics)`: pasted views and instances, same shapes; metrics
    are per-image means over valid examples.
  """
  size = batch['image'].shape[0]
  if size % num_devices:
    raise ValueError(f'copy-paste: batch of {size} over {num_devices} '
                     'devices')
  fields = {k: batch[k] for k in COPY_PASTE_KEYS}
  donors = jax.tree.map(lambda x: reversed_per_device(x, num_devices),
                        fields)
  keys = jax.random.split(key, size)
  out, metrics = jax.vmap(lambda t, d, k: paste_one(t, d, k, cfg))(
      fields, donors, keys)
  new = dict(batch)
  new.update(out)
  ev = batch['example_valid'].astype(jnp.float32)
  num_ex = jnp.maximum(ev.sum(), 1.0)
  metrics = {k: (v * ev).sum() / num_ex for k, v in metrics.items()}
  return new, jax.lax.stop_gradient(metrics)
