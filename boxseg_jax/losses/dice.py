"""Dice loss (reference §2.5): `1 - 2 Σxt / (Σx² + Σt² + 1e-5)` per instance."""

import jax.numpy as jnp

DICE_EPS = 1e-5


def dice_loss(x: jnp.ndarray, target: jnp.ndarray,
              eps: float = DICE_EPS) -> jnp.ndarray:
  """Per-instance dice loss (AdelaiDet `dice_coefficient`).

  Args:
    x: `[n, ...]` scores in [0, 1] (e.g. `σ(logits)`).
    target: `[n, ...]` targets (binary or soft), same shape as `x`.
    eps: added to the denominator.

  Returns:
    `[n]` losses in [0, 1] for non-negative inputs.
  """
  n = x.shape[0]
  x = x.reshape(n, -1).astype(jnp.float32)
  target = target.reshape(n, -1).astype(jnp.float32)
  intersection = (x * target).sum(axis=1)
  union = (x ** 2).sum(axis=1) + (target ** 2).sum(axis=1) + eps
  return 1.0 - 2.0 * intersection / union
