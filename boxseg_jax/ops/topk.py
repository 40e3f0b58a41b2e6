"""``top_k`` along the last axis that stays sharded on a batch axis.

``jax.lax.top_k`` lowers to XLA's TopK, which the SPMD partitioner does
not split along batch axes: in the data-parallel train step (batch sharded
on ``data``) every per-image ``top_k`` was preceded by an all-gather of the
whole global batch's scores to every device (``benchmarks/scaling.py``
counted it; for the FCOS candidate selection at the COCO canvas that is
``[global batch, ~2.3 M]`` floats per step, growing with the number of
devices). A stable sort is partitioned along its unsorted axes, so this
version keeps each image's selection on its own device. For the large
``k`` used here (64 slots, 1000 candidates per level) XLA's GPU and TPU
backends sort for ``top_k`` too.
"""

import jax
import jax.numpy as jnp


def top_k(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """``jax.lax.top_k(x, k)`` for finite ``x``: the ``k`` largest entries of
  the last axis in descending order, ties by lower index first.

  Returns:
    ``(values [..., k], indices [..., k] int32)``.
  """
  n = x.shape[-1]
  if not 0 <= k <= n:
    raise ValueError(f"top_k: k={k} for a last axis of {n}")
  iota = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
  # Ascending on -x, stable: descending values, equal ones in index order.
  _, idx = jax.lax.sort((-x, iota), dimension=x.ndim - 1, is_stable=True,
                        num_keys=1)
  idx = idx[..., :k]
  return jnp.take_along_axis(x, idx, axis=-1), idx
