"""Train state (a pytree) and the teacher's EMA rule."""

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
  """Everything a step reads and writes; checkpointed whole by Orbax.

  Attributes:
    step: int32 scalar, optimizer updates applied so far.
    params: student parameters.
    ema_params: teacher parameters (EMA of the student, reference §4.7).
    batch_stats: student BatchNorm statistics (mask branch).
    ema_batch_stats: teacher BatchNorm statistics, never averaged (§4.7:
      buffers are not EMA'd): those of the teacher's own train-mode forward
      in methods that run one, else a copy of the student's.
    opt_state: optax state.
    bank: Peer-assisted Copy-paste memory bank (fixed-size arrays + valid
      mask); an empty dict for methods without one.
    rng: base PRNG key; step ``t`` uses ``fold_in(rng, t)`` so a resumed run
      draws the same numbers.
    num_skipped: int32, updates skipped because the loss or a gradient was
      not finite.
    skip_streak: int32, consecutive skipped updates (the loop stops the run
      past ``config.train.max_nonfinite_streak``).
  """
  step: jax.Array
  params: Any
  ema_params: Any
  batch_stats: Any
  ema_batch_stats: Any
  opt_state: Any
  bank: Any
  rng: jax.Array
  num_skipped: jax.Array
  skip_streak: jax.Array


def ema_momentum(step: jax.Array, momentum: float) -> jax.Array:
  """BoxTeacher's ``min(m, t / (t + 1))`` for 0-based step ``t``."""
  t = jnp.asarray(step, jnp.float32)
  return jnp.minimum(jnp.float32(momentum), t / (t + 1.0))


def ema_update(ema: Any, params: Any, step: jax.Array,
               momentum: float) -> Any:
  """``ema <- m_t ema + (1 - m_t) params`` (run *before* step ``t``).

  optax's Polyak average with the varying step ``1 - m_t``. At t = 0, m = 0:
  the teacher becomes the student. For t < 1/(1-m) - 1 the teacher is the
  running mean of all student iterates so far.
  """
  step_size = 1.0 - ema_momentum(step, momentum)
  new = optax.incremental_update(
      jax.tree.map(lambda p: p.astype(jnp.float32), params),
      jax.tree.map(lambda e: e.astype(jnp.float32), ema), step_size)
  return jax.tree.map(lambda n, e: n.astype(e.dtype), new, ema)
