"""BoxInst targets and losses (reference §3), pure jnp.

Grids: the mask-output grid has stride 4 (`MASK_OUT_STRIDE`); its cell
`(i, j)` is the full-resolution pixel `(4i + 2, 4j + 2)` (point sampling
`[2::4, 2::4]`, never pooling, except for the colour image, §3.3).

Neighbourhoods: a `size x size` kernel with `dilation`, center removed, in
torch `unfold` order. For 3x3 dilation 2 the 8 offsets (dy, dx) are
(-2,-2), (-2,0), (-2,2), (0,-2), (0,2), (2,-2), (2,0), (2,2); pixels outside
the grid read as 0 (zero padding).
"""

import functools

import jax
import jax.numpy as jnp

from boxseg_jax.losses.dice import dice_loss

_RGB_TO_XYZ = ((0.412453, 0.357580, 0.180423),
               (0.212671, 0.715160, 0.072169),
               (0.019334, 0.119193, 0.950227))
_WHITE_D65 = (0.95047, 1.0, 1.08883)


def neighbor_offsets(size: int = 3,
                     dilation: int = 2) -> tuple[tuple[int, int], ...]:
  """(dy, dx) of the `size**2 - 1` neighbours in unfold order (no center)."""
  half = size // 2
  offs = []
  for ky in range(size):
    for kx in range(size):
      if ky == half and kx == half:
        continue
      offs.append(((ky - half) * dilation, (kx - half) * dilation))
  return tuple(offs)


def shift2d(x: jnp.ndarray, dy: int, dx: int,
            fill: float = 0.0) -> jnp.ndarray:
  """`out[..., y, x] = x[..., y + dy, x + dx]`, `fill` outside the grid."""
  h, w = x.shape[-2:]
  pad = max(abs(dy), abs(dx))
  if pad == 0:
    return x
  widths = [(0, 0)] * (x.ndim - 2) + [(pad, pad), (pad, pad)]
  xp = jnp.pad(x, widths, constant_values=fill)
  return xp[..., pad + dy:pad + dy + h, pad + dx:pad + dx + w]


def box_masks_at_stride(boxes: jnp.ndarray, mask_shape: tuple[int, int],
                        stride: int = 4) -> jnp.ndarray:
  """Box masks on the stride grid (reference §3.1), `[..., 4] -> [..., h, w]`.

  The reference fills full-resolution rows `int(y0) .. int(y1)` and columns
  `int(x0) .. int(x1)` inclusive and point-samples `[s//2::s, s//2::s]`; we
  test the sampled pixel coordinates directly, so the full-resolution map is
  never allocated. `int` truncates: boxes must have non-negative coordinates.

  Args:
    boxes: `[..., 4]` xyxy pixels (padded canvas).
    mask_shape: `(h, w)` of the stride grid (`H // stride`, `W // stride`).
    stride: grid stride.

  Returns:
    `[..., h, w]` float32 in {0, 1}.
  """
  h, w = mask_shape
  start = stride // 2
  ys = jnp.arange(h, dtype=jnp.float32) * stride + start
  xs = jnp.arange(w, dtype=jnp.float32) * stride + start
  b = jnp.trunc(boxes.astype(jnp.float32))
  rows = (ys >= b[..., 1:2]) & (ys <= b[..., 3:4])  # [..., h]
  cols = (xs >= b[..., 0:1]) & (xs <= b[..., 2:3])  # [..., w]
  return (rows[..., :, None] & cols[..., None, :]).astype(jnp.float32)


def bottom_rows_removed(resized_height: float, original_height: float,
                        bottom_pixels_removed: int = 10) -> int:
  """Host helper: `int(bottom_pixels_removed * h_resized / h_original)`."""
  return int(bottom_pixels_removed * float(resized_height) /
             float(original_height))


def image_validity_at_stride(image_valid: jnp.ndarray,
                             rows_removed: jnp.ndarray | int,
                             stride: int = 4) -> jnp.ndarray:
  """Image validity for the pairwise term (reference §3.2), `[H, W] -> [h, w]`.

  Ones on the (resized, unpadded) image, zeros in the padding, and the last
  `rows_removed` rows of the image zeroed; then point-sampled on the stride
  grid. The image height is the number of rows that hold any valid pixel
  (the image sits at the top-left of the canvas).

  Args:
    image_valid: `[H, W]` bool canvas validity of one image.
    rows_removed: scalar int, `bottom_rows_removed(h_r, h_orig)` (0: none).
    stride: grid stride.

  Returns:
    `[H // stride, W // stride]` float32 in {0, 1}.
  """
  height = image_valid.shape[0]
  image_rows = jnp.sum(image_valid.any(axis=1).astype(jnp.int32))
  keep_rows = jnp.arange(height) < image_rows - jnp.asarray(rows_removed)
  valid = image_valid & keep_rows[:, None]
  start = stride // 2
  return valid[start::stride, start::stride].astype(jnp.float32)


def rgb2lab(rgb: jnp.ndarray) -> jnp.ndarray:
  """sRGB (D65) to CIELAB, `[..., 3]` RGB in 0..255 -> `[..., 3]` (L, a, b).

  Formula of reference §3.3 step 2 (skimage `rgb2lab` constants), float32.
  """
  c = rgb.astype(jnp.float32) / 255.0
  c = jnp.where(c > 0.04045,
                ((jnp.maximum(c, 0.04045) + 0.055) / 1.055) ** 2.4, c / 12.92)
  xyz = c @ jnp.asarray(_RGB_TO_XYZ, jnp.float32).T
  xyz = xyz / jnp.asarray(_WHITE_D65, jnp.float32)
  f = jnp.where(xyz > 0.008856, jnp.cbrt(xyz), 7.787 * xyz + 16.0 / 116.0)
  fx, fy, fz = f[..., 0], f[..., 1], f[..., 2]
  return jnp.stack([116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)],
                   axis=-1)


def color_similarity(image: jnp.ndarray,
                     validity: jnp.ndarray,
                     *,
                     stride: int = 4,
                     size: int = 3,
                     dilation: int = 2) -> jnp.ndarray:
  """Colour similarity of one image (reference §3.3), `[E, h, w]`, E = size²-1.

  `image` (raw RGB 0..255, zero padding) is average-pooled `stride x stride`,
  truncated to integers (the reference's `.byte()`), converted to LAB, and
  `S[e, y, x] = exp(-||lab(y, x) - lab(y+dy_e, x+dx_e)|| / 2)` times the
  neighbour's `validity` (out-of-grid neighbours: lab 0, validity 0).

  Args:
    image: `[H, W, 3]` un-augmented RGB 0..255; pixels where the canvas is
      padding must be 0.
    validity: `[H // stride, W // stride]` from `image_validity_at_stride`.
    stride: pooling stride (= mask output stride).
    size: kernel size.
    dilation: kernel dilation.

  Returns:
    `[E, h, w]` float32 in [0, 1]; no gradient.
  """
  height, width = image.shape[:2]
  h, w = height // stride, width // stride
  pooled = image[:h * stride, :w * stride].astype(jnp.float32).reshape(
      h, stride, w, stride, 3).mean(axis=(1, 3))
  pooled = jnp.floor(jnp.clip(pooled, 0.0, 255.0))
  lab = jnp.moveaxis(rgb2lab(pooled), -1, 0)  # [3, h, w]
  sims = []
  for dy, dx in neighbor_offsets(size, dilation):
    diff = lab - shift2d(lab, dy, dx)
    dist = jnp.sqrt(jnp.sum(diff * diff, axis=0))
    sims.append(jnp.exp(-dist * 0.5) * shift2d(validity, dy, dx))
  return jax.lax.stop_gradient(jnp.stack(sims, axis=0).astype(jnp.float32))


def projection_loss(scores: jnp.ndarray, box_masks: jnp.ndarray) -> jnp.ndarray:
  """Per-instance projection term (reference §3.4), `[n, h, w] -> [n]`.

  `dice(max_y p, max_y m) + dice(max_x p, max_x m)`, each dice with eps 1e-5;
  values in [0, 2]. The reference loss is the mean over instances.
  """
  loss_y = dice_loss(scores.max(axis=-2), box_masks.max(axis=-2))
  loss_x = dice_loss(scores.max(axis=-1), box_masks.max(axis=-1))
  return loss_x + loss_y


def _neg_log_same(log_fg, log_bg, dy, dx):
  log_fg_n = shift2d(log_fg, dy, dx)
  log_bg_n = shift2d(log_bg, dy, dx)
  return -jnp.logaddexp(log_fg + log_fg_n, log_bg + log_bg_n)


def pairwise_loss_map(logits: jnp.ndarray, size: int = 3,
                      dilation: int = 2) -> jnp.ndarray:
  """`-log P(same label)` per pixel and neighbour (reference §3.5).

  `P(same) = p_i p_j + (1 - p_i)(1 - p_j)` computed as
  `logaddexp(logσ(z_i) + logσ(z_j), logσ(-z_i) + logσ(-z_j))`. Out-of-grid
  neighbours read zero log-probabilities (weight them out).

  Args:
    logits: `[..., h, w]` mask logits.
    size: kernel size.
    dilation: kernel dilation.

  Returns:
    `[..., E, h, w]`, E = size² - 1, in unfold neighbour order.
  """
  logits = logits.astype(jnp.float32)
  log_fg = jax.nn.log_sigmoid(logits)
  log_bg = jax.nn.log_sigmoid(-logits)
  return jnp.stack([_neg_log_same(log_fg, log_bg, dy, dx)
                    for dy, dx in neighbor_offsets(size, dilation)], axis=-3)


def soft_mask_edge_weight(soft, validity, dy, dx, thresh):
  """BoxTeacher's pseudo-mask affinity edge weight for one neighbour.

  `A = m_i m_j + (1 - m_i)(1 - m_j)` of the smoothed masks `soft`, times the
  neighbour's validity; `1[A >= thresh]` (or `A` itself for `thresh < 0`).
  """
  soft_n = shift2d(soft, dy, dx)
  aff = soft * soft_n + (1.0 - soft) * (1.0 - soft_n)
  aff = aff * shift2d(validity, dy, dx)
  return aff if thresh < 0 else (aff >= thresh).astype(jnp.float32)


def _edge_weight(edge_a, edge_b, e, dy, dx, rule):
  """Edge weights of neighbour `e`: stacked (`rule=None`) or affinity."""
  if rule is None:
    return edge_a[..., e, :, :]
  return soft_mask_edge_weight(edge_a, edge_b, dy, dx, rule)


def _weighted_pairwise_sums_impl(logits, edge_a, edge_b, center_w, offsets,
                                 rule):
  log_fg = jax.nn.log_sigmoid(logits)
  log_bg = jax.nn.log_sigmoid(-logits)
  total = jnp.zeros(logits.shape[:-2], jnp.float32)
  for e, (dy, dx) in enumerate(offsets):
    w = _edge_weight(edge_a, edge_b, e, dy, dx, rule) * center_w
    total = total + jnp.sum(_neg_log_same(log_fg, log_bg, dy, dx) * w,
                            axis=(-2, -1))
  return total


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _weighted_pairwise_sums(logits, edge_a, edge_b, center_w, offsets, rule):
  return _weighted_pairwise_sums_impl(logits, edge_a, edge_b, center_w,
                                      offsets, rule)


def _weighted_pairwise_sums_fwd(logits, edge_a, edge_b, center_w, offsets,
                                rule):
  out = _weighted_pairwise_sums_impl(logits, edge_a, edge_b, center_w,
                                     offsets, rule)
  return out, (logits, edge_a, edge_b, center_w)


def _weighted_pairwise_sums_bwd(offsets, rule, res, ct):
  # Hand-written VJP: autodiff through logaddexp/log_sigmoid costs several
  # transcendentals per edge (3.7x slower fwd+bwd at 16 x 200 x 336 on
  # CPU); this form needs none per edge. With p = σ(z), q = σ(-z) (both
  # computed directly, so neither loses precision near 0 or 1) and
  # P = p_i p_j + q_i q_j:
  #   d(-log P)/dz_i = p_i q_i (q_j - p_j) / P,
  # and symmetrically for z_j, accumulated back at the neighbour's position.
  # |p_i q_i / P| <= 1 (P >= min(p_i, q_i)); P is floored at 1e-30, which
  # only matters for edges whose loss exceeds 69.
  # Out-of-grid neighbours read p = q = 1 (zero log-probabilities, as in the
  # forward), so q_j - p_j = 0 and they get no gradient.
  logits, edge_a, edge_b, center_w = res
  p = jax.nn.sigmoid(logits)
  q = jax.nn.sigmoid(-logits)
  var = p * q
  q_m_p = q - p
  grad = jnp.zeros_like(logits)
  for e, (dy, dx) in enumerate(offsets):
    w = _edge_weight(edge_a, edge_b, e, dy, dx, rule) * center_w
    p_n = shift2d(p, dy, dx, fill=1.0)
    q_n = shift2d(q, dy, dx, fill=1.0)
    w_inv = w / jnp.maximum(p * p_n + q * q_n, 1e-30)
    g_i = var * shift2d(q_m_p, dy, dx) * w_inv
    g_j = shift2d(var, dy, dx) * q_m_p * w_inv
    grad = grad + g_i + shift2d(g_j, -dy, -dx)
  return (grad * ct[..., None, None], jnp.zeros_like(edge_a),
          jnp.zeros_like(edge_b), jnp.zeros_like(center_w))


_weighted_pairwise_sums.defvjp(_weighted_pairwise_sums_fwd,
                               _weighted_pairwise_sums_bwd)


def weighted_pairwise_sums(logits: jnp.ndarray,
                           edge_weights: jnp.ndarray,
                           center_weights: jnp.ndarray,
                           *,
                           size: int = 3,
                           dilation: int = 2) -> jnp.ndarray:
  """Per-instance `Σ_{e,i} -log P_e(i) · edge_weights[e](i) · center(i)`.

  The building block of the BoxInst pairwise term: `-log P(same)` of
  `pairwise_loss_map`, weighted and summed over neighbours and pixels
  without stacking the `[..., E, h, w]` map, with a hand-written gradient
  w.r.t. `logits` (weights are treated as constants: they get zero
  gradient).

  Args:
    logits: `[..., h, w]` mask logits.
    edge_weights: broadcastable to `[..., E, h, w]` (e.g. `1[S >= τ]` of
      the image `[B, 1, E, h, w]`); must not broadcast `logits` to a larger
      leading shape.
    center_weights: broadcastable to `[..., h, w]` (e.g. box masks), same
      restriction.
    size: kernel size.
    dilation: kernel dilation.

  Returns:
    `[...]` weighted sums (one per instance).
  """
  return _weighted_pairwise_sums(
      logits.astype(jnp.float32),
      jax.lax.stop_gradient(edge_weights.astype(jnp.float32)),
      jnp.zeros((), jnp.float32),
      jax.lax.stop_gradient(center_weights.astype(jnp.float32)),
      neighbor_offsets(size, dilation), None)


def affinity_pairwise_sums(logits: jnp.ndarray,
                           soft_masks: jnp.ndarray,
                           validity: jnp.ndarray,
                           center_weights: jnp.ndarray,
                           *,
                           thresh: float = 0.5,
                           size: int = 3,
                           dilation: int = 2) -> tuple[jnp.ndarray,
                                                       jnp.ndarray]:
  """`weighted_pairwise_sums` with BoxTeacher's pseudo-mask affinity edges.

  The edge weight of neighbour `e` is `soft_mask_edge_weight` of the
  smoothed pseudo masks, computed one neighbour at a time (the
  `[..., E, h, w]` affinity tensor is never stacked).

  Args:
    logits: `[..., h, w]` mask logits.
    soft_masks: `[..., h, w]` smoothed pseudo masks (`smooth_masks`).
    validity: `[h, w]`-broadcastable neighbour validity.
    center_weights: `[..., h, w]` (box masks).
    thresh: `MASK_AFFINITY_THRESH` (0.5; < 0 uses the soft affinity).
    size: kernel size.
    dilation: kernel dilation.

  Returns:
    `(sums [...], weight_sums [...])`: the weighted loss and `Σ W` per
    instance.
  """
  offsets = neighbor_offsets(size, dilation)
  soft = jax.lax.stop_gradient(soft_masks.astype(jnp.float32))
  validity = jax.lax.stop_gradient(validity.astype(jnp.float32))
  center = jax.lax.stop_gradient(center_weights.astype(jnp.float32))
  sums = _weighted_pairwise_sums(logits.astype(jnp.float32), soft, validity,
                                 center, offsets, float(thresh))
  weight_sums = jnp.zeros(sums.shape, jnp.float32)
  for dy, dx in offsets:
    w = soft_mask_edge_weight(soft, validity, dy, dx, float(thresh)) * center
    weight_sums = weight_sums + w.sum(axis=(-2, -1))
  return sums, weight_sums


def pairwise_loss(logits: jnp.ndarray,
                  similarity: jnp.ndarray,
                  box_masks: jnp.ndarray,
                  instance_valid: jnp.ndarray | None = None,
                  *,
                  color_thresh: float = 0.3,
                  size: int = 3,
                  dilation: int = 2) -> tuple[jnp.ndarray, jnp.ndarray]:
  """BoxInst pairwise term, `Σ(loss · w) / max(Σ w, 1)` (reference §3.5).

  `w = 1[S >= color_thresh] · boxmask(center pixel) · instance_valid`. The
  sum runs over every instance, neighbour and pixel. Neighbours are handled
  one at a time from shifted slices, so the `[..., E, h, w]` loss tensor is
  never stacked, and the gradient (w.r.t. `logits` only; weights are
  targets) is a hand-written VJP.

  Args:
    logits: `[..., h, w]` mask logits (e.g. `[B, K, h, w]`).
    similarity: colour similarity broadcastable to `[..., E, h, w]` (e.g.
      `[B, 1, E, h, w]` shared by the instances of an image).
    box_masks: `[..., h, w]` box mask of each instance's GT.
    instance_valid: optional `[...]` bool.
    color_thresh: τ.
    size: kernel size.
    dilation: kernel dilation.

  Returns:
    `(loss, weight_sum)`: scalar loss (before warm-up) and `Σ w`.
  """
  center_w = box_masks.astype(jnp.float32)
  if instance_valid is not None:
    center_w = center_w * instance_valid[..., None, None].astype(jnp.float32)
  edge_masks = (similarity >= color_thresh).astype(jnp.float32)
  total = weighted_pairwise_sums(logits, edge_masks, center_w, size=size,
                                 dilation=dilation).sum()
  weight_sum = jnp.zeros((), jnp.float32)
  for e in range(len(neighbor_offsets(size, dilation))):
    weight_sum = weight_sum + jnp.sum(edge_masks[..., e, :, :] * center_w)
  return total / jnp.maximum(weight_sum, 1.0), weight_sum


def pairwise_warmup_factor(step: jnp.ndarray | int,
                           warmup_iters: int = 10000) -> jnp.ndarray:
  """`min(iter / warmup_iters, 1)` with `iter = step + 1`.

  `step` is the number of optimizer steps already taken (the train state's
  `step` before this update, 0 on the first step). The reference increments
  its counter before use, so the first step uses 1/warmup_iters.
  """
  it = jnp.asarray(step, jnp.float32) + 1.0
  return jnp.minimum(it / float(warmup_iters), 1.0)
