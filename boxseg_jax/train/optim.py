"""Optimizer and learning-rate schedule from optax (reference §7).

detectron2's ``WarmupMultiStepLR``: ``lr(t) = base * gamma^{#boundaries <= t}
* warmup(t)`` with ``warmup(t) = f + (1 - f) * t / warmup_steps`` for
``t < warmup_steps`` (``f = warmup_factor``) and 1 afterwards. Both factors
are optax schedules (``piecewise_constant_schedule`` and
``linear_schedule``); their product is the schedule.

The optimizer (``optim.name``) is SGD with momentum 0.9 (no Nesterov) and
coupled L2 weight decay added to the gradient (PyTorch SGD
``weight_decay``), the reference's choice for ResNet configs; or AdamW with
decoupled decay (BoxTeacher's Swin-B configs: lr 1e-4, wd 0.05), which we
also use for small models trained from scratch. Both with:
* frozen parameters (stem, res2, FrozenBN statistics; ``trainable_mask``)
  receiving exactly zero updates and no optimizer state;
* weight decay on normalisation parameters configurable
  (``optim.weight_decay_norm``): 0 in AdelaiDet (``WEIGHT_DECAY_NORM = 0``),
  a negative value means "same as weight_decay", BoxTeacher's behaviour
  (quirk §10.5);
* optional gradient clipping: ``per_param`` (detectron2 ``CLIP_TYPE norm``,
  applied to each tensor separately) or ``global`` (``clip_by_global_norm``).
"""

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import traverse_util



def make_schedule(o: ml_collections.ConfigDict) -> optax.Schedule:
  """``config.optim`` -> lr schedule (steps count optimizer updates)."""
  steps = optax.piecewise_constant_schedule(
      o.base_lr, {int(b): o.gamma for b in o.lr_boundaries})
  if o.warmup_steps > 0:
    warm = optax.linear_schedule(o.warmup_factor, 1.0, o.warmup_steps)
  else:
    warm = optax.constant_schedule(1.0)
  return lambda t: steps(t) * warm(t)


def norm_param_mask(params: Any) -> Any:
  """Bool tree: True for the scale/bias of normalisation layers.

  Flax's GroupNorm/BatchNorm/LayerNorm (and our FrozenBN) are the modules
  holding a ``scale`` leaf; every leaf of such a module is a norm parameter
  (convolution kernels and biases live in modules without ``scale``).
  """
  flat = traverse_util.flatten_dict(params)
  norm_modules = {k[:-1] for k in flat if k[-1] == "scale"}
  return traverse_util.unflatten_dict(
      {k: k[:-1] in norm_modules for k in flat})


def _clip_per_param(max_norm: float) -> optax.GradientTransformation:
  """Clips each gradient tensor to L2 norm ``max_norm`` (detectron2)."""

  def update(updates, state, params=None):
    del params

    def clip(g):
      norm = jnp.sqrt(jnp.sum(jnp.square(g.astype(jnp.float32))))
      return g * jnp.minimum(1.0, max_norm / (norm + 1e-6)).astype(g.dtype)

    return jax.tree.map(clip, updates), state

  return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def make_optimizer(o: ml_collections.ConfigDict,
                   trainable: Any) -> tuple[optax.GradientTransformation,
                                            optax.Schedule]:
  """Returns (tx, schedule) for ``config.optim``.

  Args:
    o: ``config.optim`` (base_lr, momentum, weight_decay, weight_decay_norm,
      warmup_*, lr_boundaries, gamma, clip_type, clip_value).
    trainable: bool pytree over params; False leaves are frozen.
  """
  schedule = make_schedule(o)

  chain = []
  if o.clip_type == "per_param":
    chain.append(_clip_per_param(o.clip_value))
  elif o.clip_type == "global":
    chain.append(optax.clip_by_global_norm(o.clip_value))
  elif o.clip_type != "none":
    raise ValueError(f"optim.clip_type: unknown value {o.clip_type!r}")

  def norm_mask(params, want_norm):
    return jax.tree.map(lambda m: m == want_norm, norm_param_mask(params))

  # weight_decay_norm < 0 means "same as weight_decay" (BoxTeacher).
  wd_norm = o.weight_decay if o.weight_decay_norm < 0 else o.weight_decay_norm
  decay = []
  if wd_norm == o.weight_decay:
    if o.weight_decay:
      decay.append(optax.add_decayed_weights(o.weight_decay))
  else:
    if o.weight_decay:
      decay.append(optax.add_decayed_weights(
          o.weight_decay, mask=lambda p: norm_mask(p, False)))
    if wd_norm:
      decay.append(optax.add_decayed_weights(
          wd_norm, mask=lambda p: norm_mask(p, True)))
  if o.name == "sgd":
    # Coupled L2: decay joins the gradient before momentum (PyTorch SGD).
    chain += decay
    chain.append(optax.sgd(schedule, momentum=o.momentum, nesterov=False))
  elif o.name == "adamw":
    # Decoupled decay: added after Adam's scaling, times the learning rate
    # (torch.optim.AdamW).
    chain += [optax.scale_by_adam(), *decay,
              optax.scale_by_learning_rate(schedule)]
  else:
    raise ValueError(f"optim.name: unknown optimizer {o.name!r}")
  tx = optax.chain(*chain)
  labels = jax.tree.map(lambda t: "train" if t else "frozen", trainable)
  tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()},
                             labels)
  return tx, schedule

