"""BoxTeacher's student mask losses (reference §4.5-4.6), pure jnp.

Per selected instance `k` (a mask-head slot) with mask probabilities `p_k`,
the binary pseudo mask `m_k` of its GT (clipped to the GT box) and the flag
`s_k` (the teacher's mask score; 0 = no pseudo mask):

* noise-aware pixel loss `L_mask = Σ_k s_k dice(p_k, m_k) / N_v`;
* noise-reduced affinity loss `L_aff = Σ_k s_k a_k / N_v`, with
  `a_k = Σ_{e,i} -log P_e(i) W_k[e, i] / max(Σ W_k, 1)`,
  `W = 1[A >= 0.5] · boxmask(i)` and `A` the pseudo-mask affinity of the
  smoothed mask `m̃ = (avgpool3x3(m) + m) / 2` (zero padding counted);

`N_v = max(#{k: s_k > 0}, 1)` (`FIX_REDUCTION`), here over the global batch.
"""

import jax
import jax.numpy as jnp

from boxseg_jax.losses import boxinst
from boxseg_jax.losses.dice import dice_loss


def smooth_masks(masks: jnp.ndarray) -> jnp.ndarray:
  """`(avgpool3x3(m) + m) / 2`, zero padding counted (`[..., h, w]`)."""
  m = masks.astype(jnp.float32)
  total = jnp.zeros_like(m)
  for dy in (-1, 0, 1):
    for dx in (-1, 0, 1):
      total = total + boxinst.shift2d(m, dy, dx)
  return (total / 9.0 + m) / 2.0


def mask_affinity(masks: jnp.ndarray, validity: jnp.ndarray, *,
                  size: int = 3, dilation: int = 2) -> jnp.ndarray:
  """Pseudo-mask affinity `A` (reference §4.5 step 4), `[..., E, h, w]`.

  The stacked form, for inspection and tests; the loss computes the same
  edges one neighbour at a time (`boxinst.affinity_pairwise_sums`).

  Args:
    masks: `[..., h, w]` pseudo masks (binary, clipped to the box).
    validity: `[h, w]` image validity (bottom rows removed, no padding).
    size: kernel size.
    dilation: kernel dilation.
  """
  soft = smooth_masks(masks)
  return jnp.stack([
      boxinst.soft_mask_edge_weight(soft, validity, dy, dx, -1.0)
      for dy, dx in boxinst.neighbor_offsets(size, dilation)], axis=-3)


def num_valid_masks(flags: jnp.ndarray, valid: jnp.ndarray) -> jnp.ndarray:
  """`N_v = max(#{k valid: s_k > 0}, 1)`."""
  has = (flags > 0) & valid
  return jnp.maximum(jnp.sum(has.astype(jnp.float32)), 1.0)


def noise_aware_pixel_loss(scores: jnp.ndarray, pseudo: jnp.ndarray,
                           flags: jnp.ndarray, valid: jnp.ndarray
                           ) -> jnp.ndarray:
  """`Σ_k s_k dice(p_k, m_k) / N_v` (before the 0.5 weight and warm-up).

  Args:
    scores: `[..., h, w]` mask probabilities of the instances.
    pseudo: `[..., h, w]` binary pseudo masks.
    flags: `[...]` pseudo-mask scores `s_k` (0: none).
    valid: `[...]` bool, slots that hold an instance.
  """
  lead = scores.shape[:-2]
  h, w = scores.shape[-2:]
  dice = dice_loss(scores.reshape((-1, h, w)),
                   pseudo.reshape((-1, h, w))).reshape(lead)
  weight = flags.astype(jnp.float32) * valid.astype(jnp.float32)
  return jnp.sum(weight * dice) / num_valid_masks(flags, valid)


def noise_reduced_affinity_loss(logits: jnp.ndarray, pseudo: jnp.ndarray,
                                validity: jnp.ndarray,
                                box_masks: jnp.ndarray, flags: jnp.ndarray,
                                valid: jnp.ndarray, *, thresh: float = 0.5,
                                size: int = 3, dilation: int = 2
                                ) -> jnp.ndarray:
  """`Σ_k s_k a_k / N_v` (before the 0.1 weight and warm-up).

  Args:
    logits: `[B, K, h, w]` mask logits.
    pseudo: `[B, K, h, w]` pseudo masks (clipped to the box, before
      binarisation; the teacher's are already binary).
    validity: `[B, h, w]` image validity (neighbour gate).
    box_masks: `[B, K, h, w]` GT box masks (centre gate).
    flags: `[B, K]`.
    valid: `[B, K]` bool.
    thresh: `MASK_AFFINITY_THRESH` (< 0: soft affinities as weights).
    size: kernel size.
    dilation: kernel dilation.
  """
  sums, weight_sums = boxinst.affinity_pairwise_sums(
      logits, boxteacher_soft(pseudo), validity[:, None], box_masks,
      thresh=thresh, size=size, dilation=dilation)
  per_inst = sums / jnp.maximum(weight_sums, 1.0)
  weight = flags.astype(jnp.float32) * valid.astype(jnp.float32)
  return jnp.sum(weight * per_inst) / num_valid_masks(flags, valid)


def boxteacher_soft(pseudo: jnp.ndarray) -> jnp.ndarray:
  """The smoothed pseudo masks the affinity is computed from (no grad)."""
  return jax.lax.stop_gradient(smooth_masks(pseudo))
