"""BoxSeg's Peer-assisted Copy-paste (PC): a memory bank of high-quality
objects pasted into the student view so that they overlap a learner object.

Pure jnp, static shapes, run inside the one jitted train step after the
pseudo labels (reference §4C.6; the paper's §4B.5; the port's defaults and
options are §4C.8 rows 14-25, docs/methods.md has the table).

The bank (`init_bank`) is a dict of fixed-size arrays with a leading
per-device axis (one bank per device, never synchronised, as the code's
per-process bank): `capacity` entries, each one source image's admitted
objects (at most `max_objects`, keyed by the tuple of their classes in GT
order) as a fixed-size crop of the student view and of the geometric view
(the colour-similarity source) at a stride-aligned `offset`, their binary
masks on the stride-4 grid of the crop, classes, GT boxes (source canvas
pixels), mask-quality scores and an object validity; `valid` marks used
entries, `rng` is the device's own key. The crop holds every admitted
object whole (an object that does not fit in the crop with those admitted
before it is not admitted and is counted), so pasting from it is
pixel-identical to pasting from the whole source image: integer shifts,
only the peer's mask `U` is copied.

Per image, in order within a device (`lax.scan`), `paste_one`:

1. draw `u`; with the code's schedule the image only feeds the bank when
   `u < rate · min(t / ramp_steps, 1)`, else a paste is attempted
   (`schedule="rampup"`: a paste is attempted when `u` is below it);
2. attempt: choose an entry, a peer object and a learner GT (`type`:
   `instance`, a random entry sharing a class with the image, its best
   object of such a class, a random GT of the peer's class; `segmentation`,
   a random entry, its best object, a random GT; `simple`, a random entry,
   all its objects at their source positions), place the peer so that its
   box overlaps the learner's by `overlap_ratio` of the peer's width and
   height at least (or anywhere in the image, `placement="random"`), paste
   it into the student view and the colour-similarity view, occlude the
   target pseudo masks, re-derive every target box from its rectangle minus
   `U`, drop targets both moved by more than `box_shift_thresh` px and left
   with `min_area` px or less, append the peer (its mask box, class, stored
   mask and score); the used entry leaves the bank. A peer left with
   `min_area` px or less after the shift and the crop to the image is not
   pasted and its entry stays;
3. the image's own objects (before any paste) are offered to the bank:
   admitted iff IoU < `iou_thresh` with every other GT, mask-quality score
   > `min_mask_score`, box score > `min_box_score` and mask area >
   `min_area` px; a new class tuple takes a free entry, or a uniformly
   random one of the `capacity + 1` (possibly itself) when full.

Areas are counted on the stride-4 grid (`cells · stride²` against the
pixel thresholds: 300 px ≈ 19 cells). The full-resolution peer mask is the
grid mask upsampled by blocks (`U(y, x) = m[y // s, x // s]`), so the
composite, the peer's box and the occluded grid masks all describe one
mask. Nothing is pasted outside the target image (`image_valid`).
"""

import dataclasses

import jax
import jax.numpy as jnp

from boxseg_jax.losses import boxinst
from boxseg_jax.ops import boxes as box_ops
from boxseg_jax.ops import grid_masks as gmask
from boxseg_jax.ops import resample

TYPES = ('instance', 'segmentation', 'simple')
SCHEDULES = ('code', 'rampup')
PLACEMENTS = ('overlap', 'random')
PEERS = ('best', 'random')
LEARNERS = ('random', 'lowest_s')
COLOR_VIEWS = ('pasted', 'unpasted')

# Batch fields the paste edits; the instance fields grow by `max_pasted`.
INSTANCE_KEYS = ('boxes', 'labels', 'instance_valid', 'pseudo_masks',
                 'pseudo_flags', 'pseudo_scores')


@dataclasses.dataclass(frozen=True)
class PCConfig:
  """Static settings of PC (`config.pc`).

  Attributes:
    type: `instance` (shipped configs), `segmentation` or `simple`.
    capacity: bank entries per device (80).
    crop: `(Hc, Wc)` pixels of an entry's crop, multiples of `mask_stride`,
      at most the canvas.
    max_objects: objects stored per entry.
    iou_thresh: admission: IoU with every other GT below it (0.1).
    min_mask_score: admission: mask-quality score above it (0.5).
    min_box_score: admission: mean box score of the pseudo mask's
      candidates (the code's `pred_scores`) above it (0.5).
    min_area: mask area in pixels a bank object, a shifted peer and a kept
      occluded target must exceed (300).
    overlap_ratio: minimum overlap of the peer's box with the learner's, as
      a fraction of the peer's width / height (0.1).
    box_shift_thresh: an occluded target whose re-derived box moved by at
      most this many pixels is kept whatever its area (10).
    rate: 0.7 of `1 - rate · ramp` (code) or `rate · ramp` (rampup).
    ramp_steps: `ramp = min(t / ramp_steps, 1)` (10000).
    schedule: `code` or `rampup`.
    placement: `overlap` or `random` (peer box anywhere in the image).
    peer: `best` (highest score among the eligible objects of the entry)
      or `random` (uniform among them).
    learner: `random` or `lowest_s` (the eligible GT of lowest score).
    color_view: `pasted` (the geometric-view pixels of the peer are pasted
      into the colour-similarity image) or `unpasted` (the code).
    mask_stride: mask grid stride (4).
  """
  type: str = 'instance'
  capacity: int = 80
  crop: tuple[int, int] = (128, 128)
  max_objects: int = 4
  iou_thresh: float = 0.1
  min_mask_score: float = 0.5
  min_box_score: float = 0.5
  min_area: float = 300.0
  overlap_ratio: float = 0.1
  box_shift_thresh: float = 10.0
  rate: float = 0.7
  ramp_steps: int = 10000
  schedule: str = 'code'
  placement: str = 'overlap'
  peer: str = 'best'
  learner: str = 'random'
  color_view: str = 'pasted'
  mask_stride: int = 4

  def __post_init__(self):
    for name, allowed in (('type', TYPES), ('schedule', SCHEDULES),
                          ('placement', PLACEMENTS), ('peer', PEERS),
                          ('learner', LEARNERS),
                          ('color_view', COLOR_VIEWS)):
      if getattr(self, name) not in allowed:
        raise ValueError(f'pc.{name}={getattr(self, name)!r}: expected one '
                         f'of {allowed}')
    s = self.mask_stride
    if len(self.crop) != 2 or any(c <= 0 or c % s for c in self.crop):
      raise ValueError(f'pc.crop={self.crop!r}: expected 2 positive '
                       f'multiples of {s}')
    if self.capacity < 1 or self.max_objects < 1 or self.ramp_steps < 1:
      raise ValueError('pc: capacity, max_objects and ramp_steps must be '
                       '>= 1')

  @property
  def max_pasted(self) -> int:
    """Instance slots a paste may append (`simple` pastes a whole entry)."""
    return self.max_objects if self.type == 'simple' else 1

  @property
  def area_cells(self) -> float:
    """`min_area` in stride-grid cells."""
    return self.min_area / float(self.mask_stride ** 2)


def init_bank(cfg: PCConfig, num_devices: int, key: jax.Array) -> dict:
  """An empty bank per device.

  Args:
    cfg: settings.
    num_devices: leading axis (the mesh's `data` size).
    key: PRNG key; device `d` draws from `split(key, num_devices)[d]`.

  Returns:
    dict of `[D, ...]` arrays (module docstring).
  """
  c, k, s = cfg.capacity, cfg.max_objects, cfg.mask_stride
  hc, wc = cfg.crop
  one = {
      'valid': jnp.zeros((c,), bool),
      'offset': jnp.zeros((c, 2), jnp.int32),
      'image': jnp.zeros((c, hc, wc, 3), jnp.uint8),
      'image_color': jnp.zeros((c, hc, wc, 3), jnp.uint8),
      'masks': jnp.zeros((c, k, hc // s, wc // s), bool),
      'labels': jnp.full((c, k), -1, jnp.int32),
      'boxes': jnp.zeros((c, k, 4), jnp.float32),
      'scores': jnp.zeros((c, k), jnp.float32),
      'object_valid': jnp.zeros((c, k), bool),
  }
  bank = jax.tree.map(
      lambda x: jnp.broadcast_to(x, (num_devices,) + x.shape), one)
  bank['rng'] = jax.random.split(key, num_devices)
  return bank


def bank_bytes(cfg: PCConfig) -> int:
  """Bytes of one device's bank."""
  shapes = jax.eval_shape(lambda: init_bank(cfg, 1, jax.random.PRNGKey(0)))
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(shapes))


def paste_probability(step: jax.Array, cfg: PCConfig) -> jax.Array:
  """Probability that an image attempts a paste at step `t` (§4C.6 1)."""
  ramp = jnp.minimum(jnp.asarray(step, jnp.float32) / cfg.ramp_steps, 1.0)
  p = cfg.rate * ramp
  return 1.0 - p if cfg.schedule == 'code' else p


# ----------------------------------------------------------------- bank in


def admission(boxes: jnp.ndarray, valid: jnp.ndarray, masks: jnp.ndarray,
              flags: jnp.ndarray, scores: jnp.ndarray, cfg: PCConfig
              ) -> jnp.ndarray:
  """Objects eligible for the bank (§4C.6 step 2, §4C.8 row 16), `[N]`.

  Args:
    boxes: `[N, 4]` GT boxes.
    valid: `[N]` bool.
    masks: `[N, h, w]` pseudo masks clipped to their boxes.
    flags: `[N]` mask-quality scores `s`.
    scores: `[N]` box scores `c̄`.
    cfg: settings.
  """
  n = boxes.shape[0]
  ious = box_ops.pairwise_iou(boxes.astype(jnp.float32),
                              boxes.astype(jnp.float32))
  other = valid[None, :] & ~jnp.eye(n, dtype=bool)
  isolated = jnp.all(~other | (ious < cfg.iou_thresh), axis=1)
  high = (flags > cfg.min_mask_score) & (scores > cfg.min_box_score)
  area = (masks > 0.5).sum((-2, -1)) > cfg.area_cells
  return valid & isolated & high & area


# Shared with CutLER's copy-paste (ops/grid_masks.py): boxes and the
# full-resolution union of block-upsampled stride-grid masks.
shifted_boxes = gmask.block_boxes
full_mask = gmask.block_upsample


def fit_in_crop(eligible: jnp.ndarray, masks: jnp.ndarray, cfg: PCConfig
                ) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray,
                           jnp.ndarray]:
  """Greedy, in GT order: the eligible objects whose masks fit one crop.

  Returns:
    `(admitted [N], too_large [N], over_capacity [N], origin [2])`:
    admitted objects; eligible objects whose mask support does not fit the
    crop together with those admitted before them; eligible objects beyond
    `max_objects`; the crop's top-left grid cell (row, col).
  """
  s = cfg.mask_stride
  hg, wg = masks.shape[-2:]
  hcg, wcg = cfg.crop[0] // s, cfg.crop[1] // s
  m = masks > 0.5
  r0, r1 = gmask.first_last(m.any(-1))
  c0, c1 = gmask.first_last(m.any(-2))
  big = jnp.int32(1 << 20)

  def visit(carry, j):
    lo_r, hi_r, lo_c, hi_c, count = carry
    nlo_r, nhi_r = jnp.minimum(lo_r, r0[j]), jnp.maximum(hi_r, r1[j])
    nlo_c, nhi_c = jnp.minimum(lo_c, c0[j]), jnp.maximum(hi_c, c1[j])
    fits = (nhi_r - nlo_r <= hcg) & (nhi_c - nlo_c <= wcg)
    room = count < cfg.max_objects
    take = eligible[j] & fits & room
    carry = tuple(jnp.where(take, new, old) for new, old in zip(
        (nlo_r, nhi_r, nlo_c, nhi_c), (lo_r, hi_r, lo_c, hi_c))) + (
            count + take.astype(jnp.int32),)
    return carry, (take, eligible[j] & ~fits, eligible[j] & fits & ~room)

  init = (big, -big, big, -big, jnp.int32(0))
  (lo_r, _, lo_c, _, _), (admitted, too_large, over) = jax.lax.scan(
      visit, init, jnp.arange(masks.shape[0]))
  origin = jnp.stack([jnp.clip(lo_r, 0, hg - hcg), jnp.clip(lo_c, 0, wg - wcg)])
  return admitted, too_large, over, origin


def make_entry(image: jnp.ndarray, image_color: jnp.ndarray,
               boxes: jnp.ndarray, labels: jnp.ndarray, masks: jnp.ndarray,
               flags: jnp.ndarray, admitted: jnp.ndarray,
               origin: jnp.ndarray, cfg: PCConfig) -> dict:
  """One bank entry (no `valid`) from an image's admitted objects."""
  s, k = cfg.mask_stride, cfg.max_objects
  hc, wc = cfg.crop
  n = admitted.shape[0]
  order = jnp.argsort(~admitted, stable=True)[:min(k, n)]
  if n < k:
    order = jnp.pad(order, (0, k - n))
  obj_valid = jnp.arange(k) < admitted.sum()
  oy, ox = origin[0] * s, origin[1] * s
  crop_masks = jax.lax.dynamic_slice(
      masks[order] > 0.5, (0, origin[0], origin[1]),
      (k, hc // s, wc // s)) & obj_valid[:, None, None]
  return {
      'offset': jnp.stack([oy, ox]).astype(jnp.int32),
      'image': jax.lax.dynamic_slice(image, (oy, ox, 0), (hc, wc, 3)),
      'image_color': jax.lax.dynamic_slice(image_color, (oy, ox, 0),
                                           (hc, wc, 3)),
      'masks': crop_masks,
      'labels': jnp.where(obj_valid, labels[order], -1).astype(jnp.int32),
      'boxes': jnp.where(obj_valid[:, None], boxes[order], 0.0).astype(
          jnp.float32),
      'scores': jnp.where(obj_valid, flags[order], 0.0).astype(jnp.float32),
      'object_valid': obj_valid,
  }


def insert(bank: dict, entry: dict, offer: jnp.ndarray, key: jax.Array
           ) -> tuple[dict, jnp.ndarray]:
  """Stores `entry` if `offer` and its class tuple is new (§4C.8 row 17).

  A free entry takes it; a full bank deletes a uniformly random one of its
  `capacity` entries and the new one (so the new one may be the deleted
  one). An existing key is never replaced.

  Returns:
    `(bank, stored)`.
  """
  valid = bank['valid']
  capacity = valid.shape[0]
  same = valid & jnp.all(bank['labels'] == entry['labels'][None], axis=1)
  is_new = offer & ~same.any()
  full = valid.all()
  r = jax.random.randint(key, (), 0, capacity + 1)
  slot = jnp.where(full, jnp.minimum(r, capacity - 1), jnp.argmin(valid))
  stored = is_new & (~full | (r < capacity))
  out = dict(bank)
  for name, value in entry.items():
    out[name] = bank[name].at[slot].set(
        jnp.where(stored, value, bank[name][slot]))
  out['valid'] = valid.at[slot].set(valid[slot] | stored)
  return out, stored


# ---------------------------------------------------------------- bank out


def choose(bank: dict, labels: jnp.ndarray, valid: jnp.ndarray,
           flags: jnp.ndarray, key: jax.Array, cfg: PCConfig
           ) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray, jnp.ndarray]:
  """Entry, peer objects and learner of one paste (§4C.6 step 3).

  `instance`: up to `|bank|` uniform draws of an entry (with replacement);
  the first sharing a class with the target's GTs is used. `segmentation`
  and `simple`: the first draw.

  Args:
    bank: one device's bank (no leading axis).
    labels: `[N]` target classes.
    valid: `[N]` target GT validity.
    flags: `[N]` target mask-quality scores (`learner="lowest_s"`).
    key: PRNG key.
    cfg: settings.

  Returns:
    `(found, entry, selected [K] bool, learner)`: whether a paste can be
    tried, the entry index, the objects to paste and the learner GT.
  """
  k_draw, k_peer, k_learner = jax.random.split(key, 3)
  capacity = bank['valid'].shape[0]
  ev = bank['valid']
  num = ev.sum()
  logits = jnp.where(ev, 0.0, -jnp.inf)
  draws = jax.random.categorical(k_draw, logits, shape=(capacity,))
  obj_valid = bank['object_valid'] & ev[:, None]
  if cfg.type == 'instance':
    shared = (bank['labels'][:, :, None] == labels[None, None, :]) & valid
    eligible_obj = obj_valid & shared.any(-1)                  # [C, K]
    hit = eligible_obj.any(-1)[draws] & (jnp.arange(capacity) < num)
    found = hit.any()
    entry = draws[jnp.argmax(hit)]
  else:
    eligible_obj = obj_valid
    found = num > 0
    if cfg.type == 'segmentation':
      found = found & valid.any()
    entry = draws[0]
  cand = eligible_obj[entry]
  if cfg.type == 'simple':
    return found, entry, cand, jnp.int32(0)
  if cfg.peer == 'best':
    # An exact tie takes the first object (the code crashes on one).
    peer = jnp.argmax(jnp.where(cand, bank['scores'][entry], -jnp.inf))
  else:
    peer = jax.random.categorical(k_peer, jnp.where(cand, 0.0, -jnp.inf))
  selected = (jnp.arange(cand.shape[0]) == peer) & cand
  learner_ok = valid
  if cfg.type == 'instance':
    learner_ok = valid & (labels == bank['labels'][entry, peer])
  if cfg.learner == 'random':
    learner = jax.random.categorical(k_learner,
                                     jnp.where(learner_ok, 0.0, -jnp.inf))
  else:
    learner = jnp.argmin(jnp.where(learner_ok, flags, jnp.inf))
  return found & learner_ok.any(), entry, selected, learner


def place(peer_box: jnp.ndarray, learner_box: jnp.ndarray,
          image_hw: tuple[jnp.ndarray, jnp.ndarray], key: jax.Array,
          cfg: PCConfig) -> jnp.ndarray:
  """Integer shift `(dy, dx)` of the peer (§4C.6 step 4, row 20).

  `overlap`: new top-left `x ~ U[X1 - (1 - r) w, X2 - r w]` (and `y`),
  `r = overlap_ratio`, `w` the peer box's width: on each axis the boxes
  overlap by at least `min(r w, learner width)`. `random`: `x ~ U[0,
  max(W_img - w, 0)]`. The shift is `round(x - x1)` (half to even, as
  Python's `round`).
  """
  u = jax.random.uniform(key, (2,))
  pb = peer_box.astype(jnp.float32)
  lb = learner_box.astype(jnp.float32)
  size = jnp.stack([pb[3] - pb[1], pb[2] - pb[0]])        # (h, w)
  if cfg.placement == 'overlap':
    r = cfg.overlap_ratio
    lo = jnp.stack([lb[1], lb[0]]) - (1.0 - r) * size
    hi = jnp.stack([lb[3], lb[2]]) - r * size
  else:
    extent = jnp.stack(image_hw).astype(jnp.float32)
    lo = jnp.zeros((2,), jnp.float32)
    hi = jnp.maximum(extent - size, 0.0)
  top_left = lo + u * (hi - lo)
  return jnp.round(top_left - jnp.stack([pb[1], pb[0]])).astype(jnp.int32)


def shifted_masks(crop_masks: jnp.ndarray, origin: jnp.ndarray,
                  image_valid: jnp.ndarray, stride: int) -> jnp.ndarray:
  """Crop-grid masks `[K, hc, wc]` on the target's stride grid.

  `origin` = (row, col) pixel of the crop's top-left on the target canvas
  (offset + shift). Grid cell `(a, b)` samples pixel `(s a + s/2, s b +
  s/2)`, which lies in crop cell `((s a + s/2 - oy) // s, ...)`; cells
  outside the crop or the target image are 0. `[K, H/s, W/s]` bool.
  """
  k, hcg, wcg = crop_masks.shape
  height, width = image_valid.shape
  s = stride
  py = s * jnp.arange(height // s) + s // 2 - origin[0]
  px = s * jnp.arange(width // s) + s // 2 - origin[1]
  iy, ix = py // s, px // s
  ok_y = (iy >= 0) & (iy < hcg)
  ok_x = (ix >= 0) & (ix < wcg)
  g = crop_masks[:, jnp.clip(iy, 0, hcg - 1)][:, :, jnp.clip(ix, 0, wcg - 1)]
  region = image_valid[s // 2::s, s // 2::s]
  return g & ok_y[None, :, None] & ok_x[None, None, :] & region[None]


def rederive_boxes(boxes: jnp.ndarray, covered: jnp.ndarray,
                   image_hw: tuple[jnp.ndarray, jnp.ndarray]
                   ) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Tight boxes of `rect_j ∖ U` (§4C.6 step 5), without `[N, H, W]` maps.

  `rect_j` = rows `⌊y1⌋ … ⌊y2⌋`, columns `⌊x1⌋ … ⌊x2⌋` inclusive, inside
  the image (the code's `_get_masks_from_boxes` on the image-sized mask), so
  an untouched box becomes `[⌊x1⌋, ⌊y1⌋, ⌊x2⌋ + 1, ⌊y2⌋ + 1]` (clipped to
  the image). A row of the rectangle survives iff `U` does not cover all
  its columns (row counts from a prefix sum of `U`), likewise a column.

  Args:
    boxes: `[N, 4]` xyxy, non-negative.
    covered: `[H, W]` bool `U`.
    image_hw: `(h, w)` of the image.

  Returns:
    `(boxes [N, 4], nonempty [N])`.
  """
  height, width = covered.shape
  h, w = image_hw
  b = jnp.floor(boxes.astype(jnp.float32)).astype(jnp.int32)
  c0 = jnp.clip(b[:, 0], 0, w - 1)
  r0 = jnp.clip(b[:, 1], 0, h - 1)
  c1 = jnp.clip(b[:, 2], 0, w - 1)
  r1 = jnp.clip(b[:, 3], 0, h - 1)
  u = covered.astype(jnp.int32)
  csx = jnp.pad(jnp.cumsum(u, axis=1), ((0, 0), (1, 0)))   # [H, W + 1]
  csy = jnp.pad(jnp.cumsum(u, axis=0), ((1, 0), (0, 0)))   # [H + 1, W]
  row_cov = (csx[:, c1 + 1] - csx[:, c0]).T                # [N, H]
  col_cov = csy[r1 + 1, :] - csy[r0, :]                    # [N, W]
  ys, xs = jnp.arange(height), jnp.arange(width)
  row_left = ((ys >= r0[:, None]) & (ys <= r1[:, None]) &
              (row_cov < (c1 - c0 + 1)[:, None]))
  col_left = ((xs >= c0[:, None]) & (xs <= c1[:, None]) &
              (col_cov < (r1 - r0 + 1)[:, None]))
  y0, y1 = gmask.first_last(row_left)
  x0, x1 = gmask.first_last(col_left)
  nonempty = row_left.any(-1) & (r1 >= r0) & (c1 >= c0)
  return jnp.stack([x0, y0, x1, y1], -1).astype(jnp.float32), nonempty


# ------------------------------------------------------------------ per image


def paste_one(bank: dict, ex: dict, key: jax.Array, step: jax.Array,
              cfg: PCConfig) -> tuple[dict, dict, dict]:
  """One image: maybe paste a peer from the bank, then offer it to the bank.

  Args:
    bank: one device's bank without `rng` (no leading axis).
    ex: one example: `image`, `image_teacher` `[H, W, 3]` uint8,
      `image_valid [H, W]`, `boxes [N, 4]`, `labels [N]`, `instance_valid
      [N]` (already and-ed with `example_valid`), `example_valid` (a
      padding example neither pastes nor feeds the bank), `pseudo_masks
      [N, h, w]`, `pseudo_flags [N]`, `pseudo_scores [N]`.
    key: PRNG key of the image.
    step: optimizer steps already taken (`t`).
    cfg: settings.

  Returns:
    `(bank, out, metrics)`: `out` has `image`, `image_teacher` and the
    instance fields with `N + max_pasted` rows (the peers last); metrics are
    per-image scalars.
  """
  s = cfg.mask_stride
  k_u, k_choose, k_place, k_insert = jax.random.split(key, 4)
  valid = ex['instance_valid']
  boxes = ex['boxes'].astype(jnp.float32)
  grid = ex['pseudo_masks'].shape[-2:]
  # Step 0: pseudo masks clipped to their GT rectangle.
  masks = (ex['pseudo_masks'].astype(jnp.float32) *
           boxinst.box_masks_at_stride(boxes, grid, s) *
           valid[:, None, None].astype(jnp.float32))
  flags = ex['pseudo_flags'].astype(jnp.float32)
  scores = ex['pseudo_scores'].astype(jnp.float32)
  image_hw = resample.valid_extent(ex['image_valid'])

  # Step 1: bank only or attempt.
  attempt = jax.random.uniform(k_u) < paste_probability(step, cfg)
  attempt = attempt & ex['example_valid']

  # Step 3: entry, peer(s), learner; step 4: placement.
  found, entry, selected, learner = choose(bank, ex['labels'], valid, flags,
                                           k_choose, cfg)
  found = found & attempt
  obj = jnp.argmax(selected)
  if cfg.type == 'simple':
    shift = jnp.zeros((2,), jnp.int32)
  else:
    shift = place(bank['boxes'][entry, obj], boxes[learner], image_hw,
                  k_place, cfg)
  origin = bank['offset'][entry] + shift
  crop_masks = bank['masks'][entry] & selected[:, None, None]
  grid_masks = shifted_masks(crop_masks, origin, ex['image_valid'], s)
  pasted_obj = selected & (grid_masks.sum((-2, -1)) > cfg.area_cells)
  pasted = found & pasted_obj.any()
  pasted_obj = pasted_obj & pasted
  grid_masks = grid_masks & pasted_obj[:, None, None]
  union_crop = (crop_masks & pasted_obj[:, None, None]).any(0)
  cover, rows, cols = gmask.block_upsample(union_crop, origin,
                                           ex['image_valid'], s)

  # Step 5: composite and label update.
  def composite(target, source):
    patch = source[rows][:, cols]
    return jnp.where(cover[..., None], patch, target)

  image = composite(ex['image'], bank['image'][entry])
  image_teacher = ex['image_teacher']
  if cfg.color_view == 'pasted':
    image_teacher = composite(image_teacher, bank['image_color'][entry])
  cover_grid = grid_masks.any(0)
  occluded = masks * (1.0 - cover_grid.astype(jnp.float32))
  new_boxes, nonempty = rederive_boxes(boxes, cover, image_hw)
  moved = jnp.max(jnp.abs(new_boxes - boxes), axis=-1)
  area_left = (occluded > 0.5).sum((-2, -1)) > cfg.area_cells
  keep = valid & nonempty & ((moved <= cfg.box_shift_thresh) | area_left)
  keep = jnp.where(pasted, keep, valid)
  dropped = valid & ~keep
  t_boxes = jnp.where(pasted, new_boxes, boxes) * keep[:, None]
  t_masks = jnp.where(pasted, occluded, masks) * keep[:, None, None]
  peer_boxes = gmask.block_boxes(crop_masks & pasted_obj[:, None, None],
                                 origin, image_hw, s)
  p = cfg.max_pasted
  if p == 1:
    pick = obj[None]
  else:
    pick = jnp.arange(p)
  out = {
      'image': image,
      'image_teacher': image_teacher,
      'boxes': jnp.concatenate([t_boxes, peer_boxes[pick]]),
      'labels': jnp.concatenate([
          jnp.where(keep, ex['labels'], -1),
          jnp.where(pasted_obj[pick], bank['labels'][entry][pick], -1)
      ]).astype(ex['labels'].dtype),
      'instance_valid': jnp.concatenate([keep, pasted_obj[pick]]),
      'pseudo_masks': jnp.concatenate(
          [t_masks, grid_masks[pick].astype(jnp.float32)]),
      'pseudo_flags': jnp.concatenate(
          [flags * keep, jnp.where(pasted_obj[pick],
                                   bank['scores'][entry][pick], 0.0)]),
      # The code does not carry the box scores over; a peer has none.
      'pseudo_scores': jnp.concatenate([scores * keep, jnp.zeros((p,))]),
  }
  # The used entry leaves the bank.
  bank = dict(bank, valid=bank['valid'].at[entry].set(
      bank['valid'][entry] & ~pasted))

  # Step 2: the image's own objects (before the paste) offered to the bank.
  eligible = admission(boxes, valid, masks, flags, scores, cfg)
  admitted, too_large, over, cell = fit_in_crop(eligible, masks, cfg)
  new_entry = make_entry(ex['image'], ex['image_teacher'], boxes,
                         ex['labels'], masks, flags, admitted, cell, cfg)
  bank, stored = insert(bank, new_entry, admitted.any() & ex['example_valid'],
                        k_insert)
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  metrics = {
      'pc_attempted': f32(attempt),
      'pc_pasted': f32(pasted),
      'pc_targets_dropped': f32(dropped.sum()),
      'pc_admitted': f32(admitted.sum()),
      'pc_too_large': f32(too_large.sum()),
      'pc_entry_full': f32(over.sum()),
      'pc_stored': f32(stored),
  }
  return bank, out, metrics


# ------------------------------------------------------------------ batch


def paste_device(bank: dict, examples: dict, step: jax.Array,
                 cfg: PCConfig) -> tuple[dict, dict, dict]:
  """`paste_one` over one device's images, in order (`lax.scan`).

  Args:
    bank: one device's bank (with its `rng`).
    examples: the device's examples, `[b, ...]` (fields of `paste_one`).
    step: optimizer steps already taken.
    cfg: settings.

  Returns:
    `(bank, out [b, ...], metrics [b])`.
  """
  rng, use = jax.random.split(bank['rng'])
  keys = jax.random.split(use, examples['image'].shape[0])
  state = {k: v for k, v in bank.items() if k != 'rng'}

  def body(state, xs):
    ex, key = xs
    state, out, metrics = paste_one(state, ex, key, step, cfg)
    return state, (out, metrics)

  state, (out, metrics) = jax.lax.scan(body, state, (examples, keys))
  return dict(state, rng=rng), out, metrics


def apply(bank: dict, batch: dict, step: jax.Array, cfg: PCConfig
          ) -> tuple[dict, dict, dict]:
  """PC on a global batch: device `d` pastes its own images from its bank.

  The batch's leading axis is split into `[D, B / D]` (`D` = the bank's
  leading axis = the `data` mesh size), so device `d` sees exactly the
  images of its shard, in order, as the code's per-process bank does.

  Args:
    bank: `init_bank` arrays `[D, ...]`.
    batch: the labelled batch (contract fields plus `pseudo_masks`,
      `pseudo_flags`, `pseudo_scores`).
    step: optimizer steps already taken.
    cfg: settings.

  Returns:
    `(bank, batch, metrics)`: the batch with the pasted `image` and
    `image_teacher` (the colour-similarity source) and the instance fields
    grown to `N + max_pasted`; `monitor_masks` (GT masks of the un-pasted
    instance list) is dropped. Metrics: `pc_attempted`, `pc_pasted` (per
    image), `pc_targets_dropped`, `pc_admitted`, `pc_too_large`,
    `pc_entry_full` (objects per image), `pc_stored` (per image),
    `pc_bank_size` (entries per device).
  """
  num_dev = bank['valid'].shape[0]
  size = batch['image'].shape[0]
  if size % num_dev:
    raise ValueError(f'pc: batch of {size} over {num_dev} banks')
  ex = {k: batch[k] for k in ('image', 'image_teacher', 'image_valid',
                              'boxes', 'labels', 'pseudo_masks',
                              'pseudo_flags', 'pseudo_scores',
                              'example_valid')}
  ex['instance_valid'] = batch['instance_valid'] & batch['example_valid'][
      :, None]
  per_dev = jax.tree.map(
      lambda x: x.reshape((num_dev, size // num_dev) + x.shape[1:]), ex)
  bank, out, metrics = jax.vmap(
      lambda b, e: paste_device(b, e, step, cfg))(bank, per_dev)
  out = jax.tree.map(lambda x: x.reshape((size,) + x.shape[2:]), out)
  new = {k: v for k, v in batch.items() if k != 'monitor_masks'}
  new.update(out)
  # Image-level metrics average over valid examples.
  ev = batch['example_valid'].reshape(num_dev, -1).astype(jnp.float32)
  num_ex = jnp.maximum(ev.sum(), 1.0)
  metrics = {k: (v * ev).sum() / num_ex for k, v in metrics.items()}
  metrics['pc_bank_size'] = bank['valid'].sum(-1).astype(
      jnp.float32).mean()
  return bank, new, jax.lax.stop_gradient(metrics)
