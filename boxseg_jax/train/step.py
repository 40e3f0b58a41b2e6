"""The two compiled functions: ``train_step`` and ``eval_step``.

Both are ``jax.jit`` over a ``Mesh`` with one ``data`` axis: the batch is
sharded on its leading axis, the state is replicated (the current form of
data parallelism; with ``jax.distributed.initialize()`` the same program
spans hosts). Every loss is computed on the *global* batch inside one
program, so normalisers such as the number of positives are global counts
without any explicit collective; mask-branch BatchNorm statistics are
therefore global-batch statistics (SyncBN semantics; docs/training.md).
"""

import dataclasses
import functools
from typing import Any, Callable, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from boxseg_jax import config as config_lib
from boxseg_jax.losses import condinst as condinst_losses
from boxseg_jax.losses import mask_terms
from boxseg_jax.methods import boxteacher
from boxseg_jax.methods import cutler
from boxseg_jax.methods import pc
from boxseg_jax.methods import qam
from boxseg_jax.ops import detections
from boxseg_jax.ops.locations import fcos_locations
from boxseg_jax.train import state as state_lib

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
      cls_loss=lc.cls_loss,
      vfl_alpha=lc.vfl_alpha,
      vfl_gamma=lc.vfl_gamma,
      mask_head_channels=mc.mask_head_channels,
      mask_head_num_layers=mc.mask_head_num_layers,
      bottom_pixels_removed=lc.bottom_pixels_removed,
      pairwise_size=lc.pairwise_size,
      pairwise_dilation=lc.pairwise_dilation)


def _boxinst_terms(config) -> Tuple[mask_terms.MaskTerm, ...]:
  lc = config.loss
  return (mask_terms.projection_term,
          functools.partial(mask_terms.pairwise_term,
                            color_thresh=lc.pairwise_color_thresh,
                            warmup_iters=lc.pairwise_warmup_iters,
                            weight=lc.pairwise_weight))


def _gt_mask_terms(config) -> Tuple[mask_terms.MaskTerm, ...]:
  del config
  return (mask_terms.gt_mask_term,)


def _boxteacher_terms(config) -> Tuple[mask_terms.MaskTerm, ...]:
  bc = config.boxteacher
  return _boxinst_terms(config) + (functools.partial(
      mask_terms.boxteacher_term, mask_weight=bc.mask_weight,
      affinity_weight=bc.affinity_weight,
      affinity_thresh=bc.affinity_thresh, warmup_iters=bc.warmup_iters),)


def _boxteacher_labels(config) -> Callable:
  bc = config.boxteacher
  cfg = boxteacher.PseudoLabelConfig(
      iou_thresh=bc.iou_thresh, score_thresh=bc.score_thresh,
      assign_quirk=bc.assign_quirk, mask_threshold=bc.mask_threshold)
  return functools.partial(boxteacher.pseudo_labels, cfg=cfg)


def _qam_labels(config) -> Callable:
  q, ec, mc, lc = config.qam, config.eval, config.model, config.loss
  cfg = qam.QAMConfig(
      k_mode=q.k_mode, k=q.k, k_min=q.k_min, k_max=q.k_max,
      k_small=q.k_small, k_large=q.k_large, k_interp=q.k_interp,
      k_area=q.k_area, min_iou=q.min_iou, class_agnostic=q.class_agnostic,
      class_filter=q.class_filter,
      box_score=q.box_score, tau=q.tau, fusion=q.fusion, mqs=q.mqs,
      mask_threshold=q.mask_threshold, score_thresh=ec.score_thresh,
      pre_nms_topk=ec.pre_nms_topk, thresh_with_ctr=ec.thresh_with_ctr,
      sizes_of_interest=tuple(lc.sizes_of_interest),
      mask_head_channels=mc.mask_head_channels,
      mask_head_num_layers=mc.mask_head_num_layers)
  return functools.partial(qam.pseudo_labels, cfg=cfg)


def _teacher_detections(config) -> Callable:
  detect_fn = make_detect_fn(config)
  return jax.vmap(detect_fn)


def _teacher_raw_outputs(config) -> Callable:
  del config
  return lambda outputs: outputs


def _num_devices(config) -> int:
  """The ``data`` mesh size ``make_mesh`` builds for ``config``."""
  n = config.train.num_devices
  return n if n > 0 else jax.device_count()


def _cutler_copy_paste(config) -> Optional[Callable]:
  c = config.cutler
  if not c.copy_paste:
    return None
  cfg = cutler.CopyPasteConfig(
      rate=c.copy_paste_rate, random_num=c.copy_paste_random_num,
      min_ratio=c.copy_paste_min_ratio, max_ratio=c.copy_paste_max_ratio,
      ioy_thresh=c.copy_paste_ioy_thresh,
      swap_xy_quirk=c.copy_paste_swap_xy_quirk)
  num_devices = _num_devices(config)
  return lambda batch, rng: cutler.copy_paste(batch, rng, cfg,
                                              num_devices=num_devices)


def _cutler_droploss(config) -> Optional[Callable]:
  c = config.cutler
  if not c.droploss:
    return None

  def fn(outputs, targets, batch):
    # The batch's canvas, static at trace time (one trace per canvas).
    h, w = batch["image"].shape[1:3]
    locs = fcos_locations(h, w)
    return cutler.droploss_weights(
        outputs["reg"], jnp.asarray(locs.points), jnp.asarray(locs.strides),
        batch["boxes"], batch["instance_valid"],
        targets["positive"] & batch["example_valid"][:, None],
        iou_thresh=c.droploss_iou_thresh)

  return fn


# What a method's pseudo labels read of the teacher's forward: its
# detections at the test thresholds (NMS, <= eval.max_detections per image)
# or its raw network outputs (BoxSeg's QAM selects pre-NMS candidates).
TEACHER_READS = {
    "detections": _teacher_detections,
    "outputs": _teacher_raw_outputs,
}


@dataclasses.dataclass(frozen=True)
class Method:
  """What a method adds to the shared CondInst step.

  Attributes:
    mask_terms: ``config -> terms`` (``losses.mask_terms``).
    pseudo_labels: ``config -> fn(teacher, batch, teacher_valid) ->
      (labels, metrics)`` for methods with a teacher (the labels join the
      batch the terms read); ``teacher`` is what ``teacher_reads`` names;
      None: no teacher forward.
    needs_masks: trains on GT masks (``data.with_masks``).
    teacher_reads: a key of ``TEACHER_READS``.
    augment: ``config -> fn(batch, rng) -> (batch, metrics)`` or None: an
      in-step augmentation of the labelled batch (after the bank piece,
      before the student forward), e.g. CutLER's copy-paste.
    location_weights: ``config -> fn(outputs, targets, batch) -> [B, L]``
      or None: a detached weight of each location's classification loss
      (``fcos_losses``' ``cls_location_weight``), e.g. DropLoss.
  """
  mask_terms: Callable
  pseudo_labels: Optional[Callable] = None
  needs_masks: bool = False
  teacher_reads: str = "detections"
  augment: Callable = lambda config: None
  location_weights: Callable = lambda config: None


METHODS = {
    "boxinst": Method(_boxinst_terms),
    "mask": Method(_gt_mask_terms, needs_masks=True),
    "boxteacher": Method(_boxteacher_terms, _boxteacher_labels),
    # BoxSeg: QAM pseudo labels, BoxTeacher's quality-weighted losses.
    "boxseg": Method(_boxteacher_terms, _qam_labels,
                     teacher_reads="outputs"),
    # BoxInst's losses with an EMA teacher whose QAM labels only feed
    # Peer-assisted Copy-paste (bank admission, the pasted peers' pixels):
    # PC on top of BoxInst (the paper's Table 6).
    "boxinst_pc": Method(_boxinst_terms, _qam_labels,
                         teacher_reads="outputs"),
    # CutLER (reference §6): dice on class-agnostic pseudo masks (MaskCut's
    # or a self-training round's), copy-paste in the step, DropLoss on the
    # FCOS classification loss (``config.cutler``; methods/cutler.py).
    "cutler": Method(_gt_mask_terms, needs_masks=True,
                     augment=_cutler_copy_paste,
                     location_weights=_cutler_droploss),
}


def pc_crop(config: ml_collections.ConfigDict) -> Tuple[int, int]:
  """PC's entry crop: ``pc.crop``, or () = the canvas (with
  ``data.canvases``: the smallest height and width of the canvases).

  The bank's shapes depend on this crop only, never on a batch's canvas.

  Raises:
    ValueError: the crop does not fit one of the canvases.
  """
  all_canvases = config_lib.canvases(config)
  crop = tuple(config.pc.crop) or tuple(
      min(c[i] for c in all_canvases) for i in range(2))
  for canvas in all_canvases:
    if crop[0] > canvas[0] or crop[1] > canvas[1]:
      where = (f"data.canvases={all_canvases}" if config.data.canvases
               else f"data.canvas={canvas}")
      raise ValueError(f"pc.crop={crop} is larger than the canvas {canvas} "
                       f"({where}): the crop must fit every canvas")
  return crop


def pc_config(config: ml_collections.ConfigDict) -> pc.PCConfig:
  """``config.pc`` as the static ``pc.PCConfig`` (crop: ``pc_crop``)."""
  p = config.pc
  crop = pc_crop(config)
  return pc.PCConfig(
      type=p.type, capacity=p.capacity, crop=crop,
      max_objects=p.max_objects, iou_thresh=p.iou_thresh,
      min_mask_score=p.min_mask_score, min_box_score=p.min_box_score,
      min_area=p.min_area, overlap_ratio=p.overlap_ratio,
      box_shift_thresh=p.box_shift_thresh, rate=p.rate,
      ramp_steps=p.ramp_steps, schedule=p.schedule, placement=p.placement,
      peer=p.peer, learner=p.learner, color_view=p.color_view)


# The train state's memory bank: PC's (``pc.enabled``) or none. A piece is
# (init(config, num_devices, key) -> bank, make_fn(config) -> fn(bank,
# batch, step) -> (bank, batch, metrics)); the step calls it on the
# labelled batch before the student's forward.
def _no_bank_init(config, num_devices, key):
  del config, num_devices, key
  return {}


def _no_bank_fn(config):
  del config
  return lambda bank, batch, step: (bank, batch, {})


def _pc_init(config, num_devices, key):
  return pc.init_bank(pc_config(config), num_devices, key)


def _pc_fn(config):
  if not uses_teacher(config):
    raise ValueError(f"pc.enabled: method {config.method!r} makes no pseudo "
                     "labels (PC pastes pseudo-labelled objects); use "
                     "boxseg, boxteacher or boxinst_pc")
  return functools.partial(pc.apply, cfg=pc_config(config))


BANKS = {False: (_no_bank_init, _no_bank_fn), True: (_pc_init, _pc_fn)}


def init_bank(config: ml_collections.ConfigDict, num_devices: int,
              key: jax.Array) -> Dict[str, jax.Array]:
  """``TrainState.bank`` at step 0 (``[num_devices, ...]`` arrays or {})."""
  return BANKS[bool(config.pc.enabled)][0](config, num_devices, key)


def make_bank_fn(config: ml_collections.ConfigDict) -> Callable:
  """``fn(bank, batch, step) -> (bank, batch, metrics)`` of the config."""
  return BANKS[bool(config.pc.enabled)][1](config)


def get_method(config: ml_collections.ConfigDict) -> Method:
  if config.method not in METHODS:
    raise ValueError(f"method: {config.method!r} not one of "
                     f"{sorted(METHODS)}")
  return METHODS[config.method]


def uses_teacher(config: ml_collections.ConfigDict) -> bool:
  """Whether ``config.method`` runs a teacher forward in the step."""
  return get_method(config).pseudo_labels is not None


def make_detect_fn(config: ml_collections.ConfigDict) -> Callable:
  """One image's ``detect`` at the test thresholds (``config.eval``)."""
  ec, mc, lc = config.eval, config.model, config.loss
  return functools.partial(
      detections.detect, score_thresh=ec.score_thresh,
      pre_nms_topk=ec.pre_nms_topk, nms_thresh=ec.nms_thresh,
      max_detections=ec.max_detections, thresh_with_ctr=ec.thresh_with_ctr,
      sizes_of_interest=tuple(lc.sizes_of_interest),
      mask_head_channels=mc.mask_head_channels,
      mask_head_num_layers=mc.mask_head_num_layers)


def _all_finite(tree) -> jax.Array:
  # One reduction over the leaves' concatenation (XLA fuses the concat into
  # it): a reduction per leaf is hundreds of kernels and minutes of CPU
  # compile time, for the same bytes read.
  leaves = [jnp.ravel(x) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  if not leaves:
    return jnp.bool_(True)
  return jnp.all(jnp.isfinite(jnp.concatenate(
      [x.astype(jnp.float32) for x in leaves])))


def teacher_forward(model, params, batch_stats, image: jax.Array,
                    bn_mode: str) -> Tuple[Dict[str, jax.Array], Any]:
  """The teacher's network outputs (no gradient) and its new BN statistics.

  ``bn_mode="train"``: BatchNorm on the teacher batch's statistics, which
  also update the teacher's own running statistics (reference §4.2);
  ``"eval"``: its running statistics, unchanged.
  """
  variables = {"params": jax.lax.stop_gradient(params),
               "batch_stats": batch_stats}
  if bn_mode == "train":
    outputs, new_vars = model.apply(variables, image, train=True,
                                    mutable=["batch_stats"])
    batch_stats = new_vars["batch_stats"]
  elif bn_mode == "eval":
    outputs = model.apply(variables, image, train=False)
  else:
    raise ValueError(f"teacher.bn_mode: {bn_mode!r} (train | eval)")
  return jax.lax.stop_gradient(outputs), batch_stats


def make_pseudo_label_fn(model, config: ml_collections.ConfigDict
                         ) -> Callable:
  """Returns ``fn(ema_params, ema_batch_stats, batch) -> (labels, metrics,
  ema_batch_stats)``: the teacher forward on its view and the method's
  pseudo labels (methods with a teacher only)."""
  method = get_method(config)
  read_fn = TEACHER_READS[method.teacher_reads](config)
  label_fn = method.pseudo_labels(config)
  view = config.teacher.view

  def fn(ema_params, ema_batch_stats, batch):
    if view == "test_scale":
      image, valid = batch["teacher_view"], batch["teacher_view_valid"]
    else:
      image, valid = batch["image_teacher"], batch["image_valid"]
    outputs, ema_batch_stats = teacher_forward(
        model, ema_params, ema_batch_stats,
        normalize_image(image, config.model), config.teacher.bn_mode)
    labels, metrics = label_fn(read_fn(outputs), batch, valid)
    return labels, metrics, ema_batch_stats

  return fn


def oracle_pseudo_labels(batch: Dict[str, jax.Array]) -> Dict[str, Any]:
  """GT masks as pseudo masks with flag 1: the pseudo-label path's ceiling.

  A diagnostic (``train.oracle_pseudo_labels``): the teacher still runs and
  its metrics are logged, but the losses see perfect labels, so a run shows
  how much a method's losses could gain from better pseudo masks.
  """
  valid = batch["instance_valid"] & batch["example_valid"][:, None]
  masks = batch["monitor_masks"] & valid[..., None, None]
  return {"pseudo_masks": masks.astype(jnp.float32),
          "pseudo_flags": valid.astype(jnp.float32),
          "pseudo_scores": valid.astype(jnp.float32)}


def make_student_batch_fn(model, config: ml_collections.ConfigDict
                          ) -> Callable:
  """Returns ``fn(state, batch) -> (batch, aux)``: what the student trains on.

  The front half of ``train_step``: the teacher's EMA update (§4.7); for
  methods with a teacher, its forward on the teacher view and the method's
  pseudo labels; with ``pc.enabled``, Peer-assisted Copy-paste from
  ``state.bank``; a method's in-step augmentation. ``aux`` holds
  ``ema_params``, ``ema_batch_stats`` (None without a teacher forward),
  ``bank``, ``rng`` and the ``metrics`` of these pieces. ``preview_step``
  runs the same function, so the pasted batches it shows are exactly the
  ones a step from that state trains on.
  """
  method = get_method(config)
  label_fn = (make_pseudo_label_fn(model, config) if method.pseudo_labels
              else None)
  bank_fn = make_bank_fn(config)
  augment_fn = method.augment(config)
  oracle = config.train.oracle_pseudo_labels
  if oracle and (label_fn is None or not config.train.monitor_pseudo_labels):
    raise ValueError("train.oracle_pseudo_labels needs a method with pseudo "
                     "labels and train.monitor_pseudo_labels=True (the GT "
                     "masks it substitutes)")

  def fn(state: state_lib.TrainState, batch: Dict[str, jax.Array]):
    rng = jax.random.fold_in(state.rng, state.step)
    # Teacher EMA before the update of step t (reference §4.7).
    ema_params = state_lib.ema_update(state.ema_params, state.params,
                                      state.step, config.teacher.momentum)
    loss_batch, teacher_metrics = batch, {}
    ema_batch_stats = None
    if label_fn is not None:
      labels, teacher_metrics, ema_batch_stats = label_fn(
          ema_params, state.ema_batch_stats, batch)
      if oracle:
        labels = oracle_pseudo_labels(batch)
      loss_batch = {**batch, **labels}
    # Peer-assisted Copy-paste: after the pseudo labels (the teacher never
    # sees a paste), before the student's forward.
    bank, loss_batch, bank_metrics = bank_fn(state.bank, loss_batch,
                                             state.step)
    if augment_fn is not None:
      # Its own stream: the other draws stay those of runs without it.
      loss_batch, augment_metrics = augment_fn(
          loss_batch, jax.random.fold_in(rng, 0xC0C0))
      bank_metrics = {**bank_metrics, **augment_metrics}
    metrics = {k: jnp.asarray(v, jnp.float32)
               for k, v in teacher_metrics.items()}
    metrics.update(bank_metrics)
    return loss_batch, dict(ema_params=ema_params,
                            ema_batch_stats=ema_batch_stats, bank=bank,
                            rng=rng, metrics=metrics)

  return fn


# What ``preview_step`` returns of the student's batch (PNGs, TensorBoard).
PREVIEW_KEYS = ("image", "image_teacher", "image_valid", "boxes", "labels",
                "instance_valid", "pseudo_masks", "pseudo_flags",
                "pseudo_scores", "example_valid")


def make_preview_step(model, config: ml_collections.ConfigDict) -> Callable:
  """Returns ``preview(state, batch) -> (batch, metrics)``: the batch a
  train step from ``state`` would train on (after the pseudo labels and
  PC's paste), the fields of ``PREVIEW_KEYS`` it has, plus ``input_image``,
  ``input_boxes`` and ``input_valid`` (the student view and GT instances
  before any paste);
  the state is not changed (jit it without donation)."""
  fn = make_student_batch_fn(model, config)

  def preview(state, batch):
    out, aux = fn(state, batch)
    shown = {k: out[k] for k in PREVIEW_KEYS if k in out}
    shown["input_image"] = batch["image"]
    shown["input_boxes"] = batch["boxes"]
    shown["input_valid"] = batch["instance_valid"]
    return shown, aux["metrics"]

  return preview


def make_train_step(model, tx: optax.GradientTransformation,
                    schedule: optax.Schedule,
                    config: ml_collections.ConfigDict) -> Callable:
  """Returns the pure (unjitted) ``train_step(state, batch)``.

  One step: ``make_student_batch_fn`` (teacher EMA, teacher forward and
  pseudo labels, PC's paste); the student's forward, FCOS + mask-term
  losses and gradients; the optax update (and the bank's), kept only where
  every tensor it writes is finite.
  """
  method = get_method(config)
  kwargs = loss_kwargs(config)
  terms = method.mask_terms(config)
  student_batch_fn = make_student_batch_fn(model, config)
  has_teacher = method.pseudo_labels is not None
  weight_fn = method.location_weights(config)

  def train_step(state: state_lib.TrainState, batch: Dict[str, jax.Array]
                 ) -> Tuple[state_lib.TrainState, Dict[str, jax.Array]]:
    loss_batch, pre = student_batch_fn(state, batch)
    rng, bank, ema_params = pre["rng"], pre["bank"], pre["ema_params"]
    ema_batch_stats = (pre["ema_batch_stats"] if has_teacher
                       else state.ema_batch_stats)
    image = normalize_image(loss_batch["image"], config.model)
    targets = None
    if weight_fn is not None:
      targets = condinst_losses.batch_targets(
          loss_batch, num_classes=config.model.num_classes,
          sizes_of_interest=kwargs["sizes_of_interest"],
          center_sampling_radius=kwargs["center_sampling_radius"])

    def loss_fn(params):
      variables = {"params": params, "batch_stats": state.batch_stats}
      outputs, new_vars = model.apply(variables, image, train=True,
                                      mutable=["batch_stats"])
      cls_weight = (None if weight_fn is None else
                    weight_fn(outputs, targets, loss_batch))
      total, aux = condinst_losses.condinst_losses(
          outputs, targets, loss_batch, mask_terms=terms, step=state.step,
          rng=rng, cls_location_weight=cls_weight, **kwargs)
      if cls_weight is not None:
        aux["droploss_kept"] = cls_weight.mean()
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
                 _all_finite(batch_stats) & _all_finite(ema_batch_stats))
    ok = loss_ok & grads_ok & update_ok

    new = dict(params=params, opt_state=opt_state, batch_stats=batch_stats,
               bank=bank)
    old = dict(params=state.params, opt_state=state.opt_state,
               batch_stats=state.batch_stats, bank=state.bank)
    if has_teacher:
      new["ema_batch_stats"] = ema_batch_stats
      old["ema_batch_stats"] = state.ema_batch_stats
    # One conditional keeps the whole update or none of it. (A `where` per
    # leaf means the same, but is hundreds of tiny kernels: it tripled the
    # step's compile time on CPU.)
    kept = jax.lax.cond(ok, lambda: new, lambda: old)
    # No teacher forward: the teacher's BN statistics are the student's
    # (never the init values), so `eval.use_teacher` evaluates the EMA
    # weights with real statistics.
    kept.setdefault("ema_batch_stats", kept["batch_stats"])
    new_state = state.replace(
        step=state.step + 1,
        ema_params=ema_params,
        **kept,
        num_skipped=state.num_skipped + (~ok).astype(jnp.int32),
        skip_streak=jnp.where(ok, 0, state.skip_streak + 1))
    metrics = {k: v.astype(jnp.float32) for k, v in aux.items()}
    metrics.update(pre["metrics"])
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
  detect = make_detect_fn(config)

  def eval_step(params, batch_stats, image):
    outputs = model.apply({"params": params, "batch_stats": batch_stats},
                          normalize_image(image, config.model), train=False)
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


def state_shardings(mesh: Mesh) -> state_lib.TrainState:
  """The state's shardings, a prefix of its pytree: everything replicated
  but the memory bank, whose leading per-device axis is sharded on
  ``data`` (each device holds and updates only its own bank)."""
  rep, data = shardings(mesh)
  fields = {f.name: rep for f in dataclasses.fields(state_lib.TrainState)}
  fields["bank"] = data
  return state_lib.TrainState(**fields)


def jit_train_step(train_step: Callable, mesh: Mesh) -> Callable:
  """jit with a donated state (``state_shardings``) and a ``data``-sharded
  batch."""
  rep, data = shardings(mesh)
  state = state_shardings(mesh)
  return jax.jit(train_step, in_shardings=(state, data),
                 out_shardings=(state, rep), donate_argnums=0)


def jit_eval_step(eval_step: Callable, mesh: Mesh) -> Callable:
  rep, data = shardings(mesh)
  return jax.jit(eval_step, in_shardings=(rep, rep, data),
                 out_shardings=data)
