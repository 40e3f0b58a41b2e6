"""The two compiled functions: ``train_step`` and ``eval_step``.

Both are ``jax.jit`` over a ``Mesh`` with one ``data`` axis: the batch is
sharded on its leading axis, the state is replicated (the current form of
data parallelism; with ``jax.distributed.initialize()`` the same program
spans hosts). Every loss is computed on the *global* batch inside one
program, so normalisers such as the number of positives are global counts
without any explicit collective; mask-branch BatchNorm statistics are
therefore global-batch statistics (SyncBN semantics; docs/training.md).
"""

import functools
from typing import Any, Callable, Dict, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from boxseg_jax.evaluation import postprocess
from boxseg_jax.losses import condinst as condinst_losses
from boxseg_jax.train import state as state_lib

LOSS_MODES = {"boxinst": "boxinst", "mask": "mask"}


def normalize_image(image: jax.Array, model_cfg) -> jax.Array:
  """uint8 RGB [B, H, W, 3] -> normalised float32 in ``input_format``."""
  x = image.astype(jnp.float32)
  if model_cfg.input_format == "BGR":
    x = x[..., ::-1]
  elif model_cfg.input_format != "RGB":
    raise ValueError(f"model.input_format: {model_cfg.input_format!r}")
  mean = jnp.asarray(model_cfg.pixel_mean, jnp.float32)
  std = jnp.asarray(model_cfg.pixel_std, jnp.float32)
  return (x - mean) / std


def loss_kwargs(config: ml_collections.ConfigDict) -> Dict[str, Any]:
  """Static keyword arguments of ``condinst_losses`` from the config."""
  lc, mc = config.loss, config.model
  return dict(
      topk_proposals_per_im=lc.topk_proposals_per_im,
      num_slots=lc.mask_slots_per_image or None,
      sizes_of_interest=tuple(lc.sizes_of_interest),
      center_sampling_radius=lc.center_sampling_radius,
      box_quality=mc.box_quality,
      mask_head_channels=mc.mask_head_channels,
      mask_head_num_layers=mc.mask_head_num_layers,
      bottom_pixels_removed=lc.bottom_pixels_removed,
      pairwise_size=lc.pairwise_size,
      pairwise_dilation=lc.pairwise_dilation,
      pairwise_color_thresh=lc.pairwise_color_thresh,
      pairwise_warmup_iters=lc.pairwise_warmup_iters)


def _all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def make_train_step(model, tx: optax.GradientTransformation,
                    schedule: optax.Schedule,
                    config: ml_collections.ConfigDict) -> Callable:
  """Returns the pure (unjitted) ``train_step(state, batch)``."""
  if config.method not in LOSS_MODES:
    raise ValueError(f"method: {config.method!r} not one of "
                     f"{sorted(LOSS_MODES)}")
  mode = LOSS_MODES[config.method]
  kwargs = loss_kwargs(config)

  def train_step(state: state_lib.TrainState, batch: Dict[str, jax.Array]
                 ) -> Tuple[state_lib.TrainState, Dict[str, jax.Array]]:
    rng = jax.random.fold_in(state.rng, state.step)
    # Teacher EMA before the update of step t (reference §4.7).
    ema_params = state_lib.ema_update(state.ema_params, state.params,
                                      state.step, config.teacher.momentum)
    image = normalize_image(batch["image"], config.model)

    def loss_fn(params):
      variables = {"params": params, "batch_stats": state.batch_stats}
      outputs, new_vars = model.apply(variables, image, train=True,
                                      mutable=["batch_stats"])
      total, aux = condinst_losses.condinst_losses(
          outputs, None, batch, mode=mode, step=state.step, rng=rng,
          **kwargs)
      return total, (aux, new_vars["batch_stats"])

    (total, (aux, batch_stats)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # Guard every tensor the update writes, not only its inputs: a finite
    # gradient times a huge learning rate can still overflow.
    loss_ok = jnp.isfinite(total)
    grads_ok = _all_finite(grads)
    update_ok = (_all_finite(params) & _all_finite(opt_state) &
                 _all_finite(batch_stats))
    ok = loss_ok & grads_ok & update_ok

    def keep(new, old):
      return jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)

    batch_stats = keep(batch_stats, state.batch_stats)
    new_state = state.replace(
        step=state.step + 1,
        params=keep(params, state.params),
        opt_state=keep(opt_state, state.opt_state),
        batch_stats=batch_stats,
        # No method here runs a teacher forward, so the teacher's BN
        # statistics are the student's (never the init values), and
        # `eval.use_teacher` evaluates the EMA weights with real statistics.
        ema_batch_stats=batch_stats,
        ema_params=ema_params,
        num_skipped=state.num_skipped + (~ok).astype(jnp.int32),
        skip_streak=jnp.where(ok, 0, state.skip_streak + 1))
    metrics = {k: v.astype(jnp.float32) for k, v in aux.items()}
    metrics.update(
        loss=total.astype(jnp.float32),
        lr=jnp.asarray(schedule(state.step), jnp.float32),
        grad_norm=optax.tree.norm(grads).astype(jnp.float32),
        update_skipped=(~ok).astype(jnp.float32),
        nonfinite_loss=(~loss_ok).astype(jnp.float32),
        nonfinite_grads=(~grads_ok).astype(jnp.float32),
        nonfinite_update=(~update_ok).astype(jnp.float32))
    return new_state, metrics

  return train_step


def make_eval_fn(model, config: ml_collections.ConfigDict) -> Callable:
  """Returns the pure ``eval_step(params, batch_stats, image) -> dets``."""
  ec, mc, lc = config.eval, config.model, config.loss
  detect = functools.partial(
      postprocess.detect, score_thresh=ec.score_thresh,
      pre_nms_topk=ec.pre_nms_topk, nms_thresh=ec.nms_thresh,
      max_detections=ec.max_detections, thresh_with_ctr=ec.thresh_with_ctr,
      sizes_of_interest=tuple(lc.sizes_of_interest),
      mask_head_channels=mc.mask_head_channels,
      mask_head_num_layers=mc.mask_head_num_layers)

  def eval_step(params, batch_stats, image):
    outputs = model.apply({"params": params, "batch_stats": batch_stats},
                          normalize_image(image, mc), train=False)
    return jax.vmap(detect)(outputs)

  return eval_step


def make_mesh(num_devices: int = -1) -> Mesh:
  """A 1-D ``data`` mesh over all (or the first ``num_devices``) devices."""
  devices = jax.devices()
  if num_devices > 0:
    devices = devices[:num_devices]
  return Mesh(devices, ("data",))


def shardings(mesh: Mesh):
  """(replicated, batch-sharded) NamedShardings."""
  return NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))


def jit_train_step(train_step: Callable, mesh: Mesh) -> Callable:
  """jit with a replicated, donated state and a ``data``-sharded batch."""
  rep, data = shardings(mesh)
  return jax.jit(train_step, in_shardings=(rep, data),
                 out_shardings=(rep, rep), donate_argnums=0)


def jit_eval_step(eval_step: Callable, mesh: Mesh) -> Callable:
  rep, data = shardings(mesh)
  return jax.jit(eval_step, in_shardings=(rep, rep, data),
                 out_shardings=data)
