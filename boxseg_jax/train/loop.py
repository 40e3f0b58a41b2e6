"""``train_and_evaluate(config, workdir)``: the training loop.

1. Mesh, writer, data (per-process shards of the global batch).
2. Model and optimizer; state born on the mesh (replicated, the PC bank
   sharded per device).
3. Resume: workdir checkpoint -> ``config.init`` (partial) -> scratch.
4. One jitted, donated ``train_step``; compiled once per canvas (each
   compilation logged with its canvas; ``data.canvases``: two).
5. Loop: metrics (CLU), progress, checkpoints, evaluation, SIGTERM.
6. Final evaluation and checkpoint.
"""

import logging
import signal
import threading
import time
from typing import Any, Dict

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from clu import metric_writers
from clu import metrics as clu_metrics
from clu import periodic_actions

from boxseg_jax import config as config_lib
from boxseg_jax import console
from boxseg_jax.data import features
from boxseg_jax.data import pipeline
from boxseg_jax.evaluation import panels
from boxseg_jax.train import checkpoint as ckpt_lib
from boxseg_jax.train import evaluate as eval_lib
from boxseg_jax.train import inference_ckpt
from boxseg_jax.train import models
from boxseg_jax.train import optim
from boxseg_jax.train import state as state_lib
from boxseg_jax.train import step as step_lib


class NonFiniteLossError(RuntimeError):
  """Raised when too many consecutive updates had a non-finite loss.

  ``.state`` holds the train state at that point (its parameters are those
  of the last finite update).
  """
  state = None


class _Sigterm:
  """Records SIGTERM (preemption) so the loop can save and exit cleanly."""

  def __init__(self):
    self.received = threading.Event()
    self._previous = None

  def install(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM received: saving a checkpoint and stopping.")
    self.received.set()

  def uninstall(self):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def global_batch(batch: features.Batch, sharding) -> Dict[str, jax.Array]:
  """Host-local numpy batch -> global arrays sharded on ``data``."""
  local = features.device_batch(batch)
  return {k: jax.make_array_from_process_local_data(sharding, v)
          for k, v in local.items()}


def init_state(config, model, tx, mesh) -> state_lib.TrainState:
  """Initialises the train state directly on the mesh (replicated, the
  memory bank sharded per device).

  ``model.init`` runs on the first canvas: parameters do not depend on the
  canvas, and the bank's shapes depend on ``pc.crop`` only.
  """
  h, w = config_lib.canvases(config)[0]
  seed_key = jax.random.PRNGKey(config.seed)
  init_rng, state_rng = jax.random.split(seed_key)
  # Its own stream, so the other keys stay those of runs without a bank.
  bank_rng = jax.random.fold_in(seed_key, 0x6a6b)

  def init_fn():
    dummy = jnp.zeros((1, h, w, 3), jnp.float32)
    variables = model.init(init_rng, dummy, train=False)
    params = variables["params"]
    batch_stats = variables.get("batch_stats", {})
    return state_lib.TrainState(
        step=jnp.zeros((), jnp.int32), params=params, ema_params=params,
        batch_stats=batch_stats, ema_batch_stats=batch_stats,
        opt_state=tx.init(params),
        bank=step_lib.init_bank(config, mesh.devices.size, bank_rng),
        rng=state_rng, num_skipped=jnp.zeros((), jnp.int32),
        skip_streak=jnp.zeros((), jnp.int32))

  return jax.jit(init_fn, out_shardings=step_lib.state_shardings(mesh))()


def make_train_input(config, proc: int = 0, num_proc: int = 1):
  """(source, TrainInput) of ``data.train``: this process' shard of the
  global batch, with GT masks where the config trains on or monitors
  them, and the teacher view for methods with a teacher."""
  monitor = config.train.monitor_pseudo_labels
  source = pipeline.make_source(
      config.data.train, shapes_cfg=config.data.shapes, role="train",
      with_masks=config.data.with_masks or monitor,
      require_masks=config.data.with_masks or monitor,
      tfds_data_dir=config.data.tfds_data_dir or None,
      annotation_file=config.data.train_annotations or None)
  if config.data.num_train_images > 0:
    source = eval_lib.Subset(source, config.data.num_train_images)
  config_lib.check_num_classes(config, source,
                               f"data.train={config.data.train}")
  tcfgs = config_lib.transform_configs(
      config, teacher_view=step_lib.uses_teacher(config))
  train_iter = pipeline.TrainInput(
      source, tcfgs, batch_size=config.data.batch_size // num_proc,
      seed=config.seed, shard_index=proc, shard_count=num_proc,
      num_threads=config.data.num_threads,
      prefetch=config.data.prefetch_batches,
      max_consecutive_skips=config.data.max_consecutive_skips,
      name=f"data.train={config.data.train}")
  return source, train_iter


def build_model_and_optimizer(config):
  """(model, tx, schedule) of ``config``."""
  model = models.build_model(config)
  abstract_params = jax.eval_shape(
      lambda: model.init(jax.random.PRNGKey(0), jnp.zeros(
          (1,) + config_lib.canvases(config)[0] + (3,)), train=False)
  )["params"]
  tx, schedule = optim.make_optimizer(
      config.optim, models.trainable_mask(config, abstract_params))
  return model, tx, schedule


def jit_preview_step(model, config, mesh):
  """``step.make_preview_step`` jitted on the mesh (nothing donated)."""
  rep, data = step_lib.shardings(mesh)
  return jax.jit(step_lib.make_preview_step(model, config),
                 in_shardings=(step_lib.state_shardings(mesh), data),
                 out_shardings=(data, rep))


def local_numpy(tree):
  """This process' rows of batch-sharded global arrays, as numpy."""
  def get(x):
    if x.is_fully_addressable:
      return np.asarray(x)
    shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start)
    return np.concatenate([np.asarray(s.data) for s in shards])
  return jax.tree.map(get, tree)


def restore_or_init(config, model, tx, mesh, ckpt: ckpt_lib.Checkpointer):
  """Resume order: workdir -> config.init (partial) -> scratch.

  Returns:
    (state, input_state or None, how) with ``how`` in {"workdir", "init",
    "scratch"}.
  """
  rep, _ = step_lib.shardings(mesh)
  if ckpt.latest_step() is not None:
    abstract = jax.eval_shape(lambda: init_state(config, model, tx, mesh))
    abstract = jax.tree.map(
        lambda sharding, sub: jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                           sharding=sharding), sub),
        step_lib.state_shardings(mesh), abstract)
    state, input_state, step = ckpt.restore(abstract)
    logging.info("Resumed from %s at step %d", ckpt.directory, step)
    return state, input_state, "workdir"
  state = init_state(config, model, tx, mesh)
  if config.init:
    loaded = ckpt_lib.load_params_for_init(config.init)
    params = ckpt_lib.merge_init_params(
        jax.device_get(state.params), loaded, tuple(config.init_keys),
        config.init)
    # Two device copies: the step donates the state, and one buffer cannot
    # be donated twice (params and ema_params).
    ema_params = jax.device_put(params, rep)
    params = jax.device_put(params, rep)
    state = state.replace(params=params, ema_params=ema_params,
                          opt_state=jax.jit(tx.init, out_shardings=rep)(
                              params))
    logging.info("Initialised %s from %s", list(config.init_keys),
                 config.init)
    return state, None, "init"
  return state, None, "scratch"


def restore_latest(config, workdir: str, what: str = "--workdir"):
  """(model, mesh, state) of ``workdir``'s newest checkpoint of a run of
  ``config`` (for tools that inspect a trained run). Raises
  FileNotFoundError naming the flag ``what`` when it has none."""
  ckpt = ckpt_lib.Checkpointer(workdir, every_steps=1, max_to_keep=1)
  try:
    if ckpt.latest_step() is None:
      raise FileNotFoundError(f"{what}={workdir}: no checkpoint (train a "
                              "short run there first)")
    mesh = step_lib.make_mesh(config.train.num_devices)
    model, tx, _ = build_model_and_optimizer(config)
    state, _, _ = restore_or_init(config, model, tx, mesh, ckpt)
  finally:
    ckpt.close()
  return model, mesh, state


def _write_student_panels(preview, step, writer, config, class_names,
                          proc):
  batch, metrics = preview
  batch = local_numpy(batch)
  if proc == 0:
    images = panels.student_batch_panels(
        batch, config.eval.num_panels, class_names,
        num_gt=config.data.max_instances if config.pc.enabled else None)
    writer.write_images(step, {"train/student_batch": images})
    logging.info("step %d: student-batch panels written (%s)", step,
                 ", ".join(f"{k} {float(v):.2f}" for k, v in metrics.items()
                           if k.startswith("pc_")))


def _save_unless_streak(ckpt, step, state, train_iter, force=False):
  """Saves unless the latest updates were skipped as non-finite.

  A checkpoint written during a non-finite streak would record a run that
  is going wrong (and its data position past the bad batches); the newest
  checkpoint stays the one before the streak.
  """
  streak = int(jax.device_get(state.skip_streak))
  if streak:
    logging.warning(
        "Not saving step %d: the last %d update(s) were skipped as "
        "non-finite (newest checkpoint: step %s).", step, streak,
        ckpt.latest_step())
    return False
  return ckpt.save(step, state, train_iter.get_state(), force=force)


def _nonfinite_message(streak, step, config, latest_ckpt, values) -> str:
  causes = [name for key, name in (
      ("nonfinite_loss", "the loss"), ("nonfinite_grads", "a gradient"),
      ("nonfinite_update", "the updated parameters / optimizer state"))
            if values.get(key, 0.0) > 0]
  return (
      f"{streak} consecutive updates were skipped as non-finite ("
      f"{' / '.join(causes) or 'a value'}; limit "
      f"train.max_nonfinite_streak={config.train.max_nonfinite_streak}). "
      f"The parameters in memory are those after step {step - streak}, the "
      f"last applied update; no checkpoint was written during the streak "
      f"(newest checkpoint: "
      f"{'none' if latest_ckpt is None else f'step {latest_ckpt}'}). "
      f"Lower optim.base_lr or enable optim.clip_type, and resume from the "
      f"checkpoint. Last metrics: {values}")


def _log_load_report(config, source) -> Dict[str, Any]:
  """Logs the training source's load statistics once; returns them."""
  n = config.data.max_instances
  report = pipeline.load_report(source, n)
  text = pipeline.format_load_report(f"data.train={config.data.train}",
                                     report, n)
  problems = sum(report.get(k, 0) for k in (
      "bad_boxes", "missing_files", "unlisted_annotations",
      "images_over_max_instances"))
  logging.log(logging.WARNING if problems else logging.INFO, "%s", text)
  return report


def _metrics_collection(keys):
  return clu_metrics.Collection.create(
      **{k: clu_metrics.Average.from_output(k) for k in keys})


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str
                       ) -> Dict[str, Any]:
  """Trains ``config`` in ``workdir``; returns a summary dict."""
  # 1. Mesh, writer, data. ----------------------------------------------
  config_lib.validate(config)
  mesh = step_lib.make_mesh(config.train.num_devices)
  num_proc, proc = jax.process_count(), jax.process_index()
  if config.data.batch_size % mesh.devices.size:
    raise ValueError(f"data.batch_size={config.data.batch_size} is not "
                     f"divisible by {mesh.devices.size} devices")
  method = step_lib.get_method(config)
  if method.needs_masks and not config.data.with_masks:
    raise ValueError(f"method={config.method!r} trains on GT masks: set "
                     "data.with_masks=True")
  monitor = config.train.monitor_pseudo_labels
  if monitor and method.pseudo_labels is None:
    raise ValueError(f"train.monitor_pseudo_labels: method "
                     f"{config.method!r} makes no pseudo labels")
  writer = metric_writers.create_default_writer(
      workdir, just_logging=proc > 0, asynchronous=True)
  writer.write_hparams({k: str(v) for k, v in
                        config.to_dict().items() if not isinstance(v, dict)})
  if proc == 0:  # read by boxseg_jax.evaluate / predict / export
    inference_ckpt.write_config(workdir, config)
  source, train_iter = make_train_input(config, proc, num_proc)
  train_data = _log_load_report(config, source)

  # 2. Model and optimizer. ---------------------------------------------
  model, tx, schedule = build_model_and_optimizer(config)

  # 3. Resume. ------------------------------------------------------------
  ckpt = ckpt_lib.Checkpointer(workdir, every_steps=config.ckpt.every_steps,
                               max_to_keep=config.ckpt.max_to_keep,
                               async_save=config.ckpt.async_save)
  state, input_state, how = restore_or_init(config, model, tx, mesh, ckpt)
  if input_state is not None:
    train_iter.set_state(input_state)
  start_step = int(jax.device_get(state.step))
  logging.info("Starting at step %d (%s)", start_step, how)

  # 4. Compiled step. -----------------------------------------------------
  # jit traces once per input shape: one compilation per canvas.
  trace_count = [0]
  canvases_seen = set()      # canvases of the batches this run trained on
  compiled_canvases = set()  # canvases train_step was traced for
  raw_step = step_lib.make_train_step(model, tx, schedule, config)

  def counted_step(s, b):
    trace_count[0] += 1  # runs at trace time only
    canvas = tuple(int(x) for x in b["image"].shape[1:3])
    logging.info("train_step: compilation %d, canvas %dx%d", trace_count[0],
                 *canvas)
    if canvas in compiled_canvases:
      logging.warning("train_step recompiled for canvas %s, which already "
                      "has a compilation (a shape or dtype changed)", canvas)
    compiled_canvases.add(canvas)
    return raw_step(s, b)

  train_step = step_lib.jit_train_step(counted_step, mesh)
  _, batch_sharding = step_lib.shardings(mesh)
  evaluator = eval_lib.Evaluator(config, model, mesh, workdir)
  # Panels of what the student trains on (pseudo masks, pasted peers): a
  # second program, compiled on first use, from the same state and batch.
  panel_every = config.train.panel_every_steps
  preview_step = jit_preview_step(model, config, mesh) if panel_every else None

  # 5. Loop. --------------------------------------------------------------
  total = config.train.num_steps
  report = periodic_actions.ReportProgress(num_train_steps=total,
                                           writer=writer, every_steps=
                                           config.train.log_every_steps)
  sigterm = _Sigterm()
  sigterm.install()
  collection = None
  metrics_cls = None  # CLU Collection type, built once from the step's keys
  host_counts = {"instances_dropped": 0.0, "instances_truncated": 0.0}
  summary: Dict[str, Any] = {"resumed_from": how, "start_step": start_step,
                             "history": []}
  summary["train_data"] = train_data
  step = start_step
  t_start = time.time()
  t_log, step_log = time.time(), start_step
  try:
    while step < total:
      # Waiting for input still reacts to SIGTERM (a stalled or failing
      # source must not make the run unkillable).
      batch = train_iter.next_or_stop(sigterm.received)
      if batch is pipeline.STOPPED:
        _save_unless_streak(ckpt, step, state, train_iter, force=True)
        ckpt.wait()
        summary["preempted_at"] = step
        logging.warning("Stopped at step %d after SIGTERM while waiting for "
                        "input; checkpoint saved.", step)
        return summary
      canvases_seen.add(tuple(int(x) for x in batch["image"].shape[1:3]))
      host_counts["instances_dropped"] += float(batch["num_dropped"].sum())
      host_counts["instances_truncated"] += float(
          batch["num_truncated"].sum())
      device_batch = global_batch(batch, batch_sharding)
      if preview_step is not None and step > 0 and step % panel_every == 0:
        _write_student_panels(preview_step(state, device_batch), step,
                              writer, config, source.class_names, proc)
      state, metrics = train_step(state, device_batch)
      step += 1
      if metrics_cls is None:
        metrics_cls = _metrics_collection(metrics)
      update = metrics_cls.single_from_model_output(**metrics)
      collection = update if collection is None else collection.merge(update)
      report(step)

      if step % config.train.log_every_steps == 0 or step == total:
        values = {k: float(v) for k, v in collection.compute().items()}
        values.update(host_counts)
        values["input_skipped"] = float(sum(train_iter.skips.counts.values()))
        streak = int(jax.device_get(state.skip_streak))
        values["updates_skipped_total"] = float(
            jax.device_get(state.num_skipped))
        writer.write_scalars(step, values)
        now = time.time()
        if proc == 0:
          print(console.progress_line(
              step, total, values, (step - step_log) / max(now - t_log,
                                                           1e-9)),
                flush=True)
        t_log, step_log = now, step
        summary["last_metrics"] = values
        summary["history"].append((step, values))
        collection = None
        if streak > config.train.max_nonfinite_streak:
          err = NonFiniteLossError(_nonfinite_message(
              streak, step, config, ckpt.latest_step(), values))
          err.state = state
          raise err

      if ckpt.due(step):
        _save_unless_streak(ckpt, step, state, train_iter)
      if (config.train.eval_every_steps and
          step % config.train.eval_every_steps == 0 and step < total):
        evaluator.run(state, step, writer)
      if sigterm.received.is_set() or ckpt.reached_preemption(step):
        _save_unless_streak(ckpt, step, state, train_iter, force=True)
        ckpt.wait()
        summary["preempted_at"] = step
        logging.warning("Stopped at step %d after SIGTERM/preemption; "
                        "checkpoint saved.", step)
        return summary

    # 6. Final evaluation and checkpoint. ---------------------------------
    summary["compilations"] = trace_count[0]
    logging.info("train_step compiled %d time(s) in this run, for %d "
                 "canvas(es) %s", trace_count[0], len(canvases_seen),
                 sorted(canvases_seen))
    _save_unless_streak(ckpt, step, state, train_iter, force=True)
    if config.train.eval_at_end:
      summary["eval"] = evaluator.run(state, step, writer)
    summary["train_seconds"] = time.time() - t_start
    return summary
  finally:
    sigterm.uninstall()
    ckpt.close()
    writer.flush()
    summary["compilations"] = trace_count[0]
    summary["canvases_seen"] = sorted(canvases_seen)
    summary["final_step"] = step
    summary["state"] = state
