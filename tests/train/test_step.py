"""The BoxTeacher train step: no teacher gradient, teacher BN statistics,
monitor inertness, and a teacher view on its own canvas.

One tiny model and one batch (configs/tiny.py); the teacher's thresholds are
opened (score 0, IoU 0) so that a randomly initialised teacher still labels
every GT and the pseudo-mask losses are not vacuous.
"""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from boxseg_jax import config_helpers
from boxseg_jax import config as config_lib
from boxseg_jax.data import features
from boxseg_jax.data import pipeline
from boxseg_jax.losses import condinst as condinst_losses
from boxseg_jax.train import loop
from boxseg_jax.train import models
from boxseg_jax.train import optim
from boxseg_jax.train import step as step_lib


def _config(**overrides):
  c = config_helpers.load_config_file("tiny")
  c.method = "boxteacher"
  c.eval.score_thresh = 0.0
  c.eval.max_detections = 20
  c.boxteacher.iou_thresh = 0.0
  c.boxteacher.warmup_iters = 1
  c.model.backbone_norm = "BN"   # BN in the backbone too: more statistics
  return config_helpers.apply_overrides(c, overrides)


class _Setup:

  def __init__(self, config, monitor=False):
    self.config = config
    self.model = models.build_model(config)
    self.mesh = step_lib.make_mesh(1)
    abstract = jax.eval_shape(lambda: self.model.init(
        jax.random.PRNGKey(0), jnp.zeros((1,) + tuple(config.data.canvas) +
                                         (3,)), train=False))
    self.tx, self.schedule = optim.make_optimizer(
        config.optim, models.trainable_mask(config, abstract["params"]))
    state = loop.init_state(config, self.model, self.tx, self.mesh)
    # Make teacher and student differ (as after training), and give the
    # teacher's BN statistics their own values.
    self.state = state.replace(
        ema_params=jax.tree.map(lambda p: p * 1.01, state.ema_params),
        ema_batch_stats=jax.tree.map(lambda s: s + 0.1,
                                     state.ema_batch_stats))
    src = pipeline.make_source(config.data.train,
                               shapes_cfg=config.data.shapes,
                               with_masks=monitor)
    tcfg = config_lib.transform_config(config, teacher_view=True)
    host = next(pipeline.TrainInput(src, tcfg,
                                    batch_size=config.data.batch_size,
                                    seed=0))
    self.batch = {k: jnp.asarray(v)
                  for k, v in features.device_batch(host).items()}
    self.step_fn = jax.jit(step_lib.make_train_step(
        self.model, self.tx, self.schedule, config))
    self.pseudo = jax.jit(lambda ema, stats: _pseudo(self, ema, stats))


@pytest.fixture(scope="module")
def setup():
  # The teacher sees a larger test-scale view on its own canvas.
  return _Setup(_config(**{"data.test_short_size": 80,
                           "teacher.canvas": (128, 128),
                           "train.monitor_pseudo_labels": True}),
                monitor=True)


def _pseudo(s, ema_params, ema_batch_stats):
  method = step_lib.get_method(s.config)
  label_fn = method.pseudo_labels(s.config)
  outputs, stats = step_lib.teacher_forward(
      s.model, ema_params, ema_batch_stats,
      step_lib.normalize_image(s.batch["teacher_view"], s.config.model),
      s.config.teacher.bn_mode)
  dets = jax.vmap(step_lib.make_detect_fn(s.config))(outputs)
  labels, metrics = label_fn(dets, s.batch, s.batch["teacher_view_valid"])
  return labels, metrics, stats


def test_teacher_view_has_its_own_canvas(setup):
  b = setup.batch
  assert b["teacher_view"].shape[1:3] == (128, 128)
  assert b["image"].shape[1:3] == (96, 96)
  # Test scale 80 vs train scales 64..80: the teacher view is never smaller.
  rows_t = np.asarray(b["teacher_view_valid"]).any(2).sum(1)
  rows_s = np.asarray(b["image_valid"]).any(2).sum(1)
  assert (rows_t >= rows_s).all() and (rows_t == 80).all()


def test_pseudo_labels_are_not_vacuous(setup):
  labels, metrics, _ = setup.pseudo(setup.state.ema_params,
                                    setup.state.ema_batch_stats)
  gt_valid = np.asarray(setup.batch["instance_valid"])
  flags = np.asarray(labels["pseudo_flags"])
  assert (flags[gt_valid] > 0).mean() > 0.5
  assert float(metrics["pseudo_fraction"]) > 0.5
  assert 0.0 <= float(metrics["pseudo_iou"]) <= 1.0


def test_teacher_gets_no_gradient(setup):
  s = setup
  terms = step_lib.get_method(s.config).mask_terms(s.config)
  image = step_lib.normalize_image(s.batch["image"], s.config.model)

  def loss(params, ema_params):
    labels, _, _ = _pseudo(s, ema_params, s.state.ema_batch_stats)
    outputs, _ = s.model.apply(
        {"params": params, "batch_stats": s.state.batch_stats}, image,
        train=True, mutable=["batch_stats"])
    total, aux = condinst_losses.condinst_losses(
        outputs, None, {**s.batch, **labels}, mask_terms=terms, step=10,
        **step_lib.loss_kwargs(s.config))
    return total, aux

  (total, aux), (g_student, g_teacher) = jax.jit(jax.value_and_grad(
      loss, argnums=(0, 1), has_aux=True))(s.state.params,
                                           s.state.ema_params)
  assert float(aux["loss_mask"]) > 0 and float(aux["loss_mask_affinity"]) > 0
  assert np.isfinite(float(total))
  assert all(float(jnp.abs(g).max()) == 0.0
             for g in jax.tree.leaves(g_teacher))
  assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(g_student))


def test_teacher_bn_statistics_change_only_through_its_forward(setup):
  s = setup
  new_state, metrics = s.step_fn(s.state, s.batch)
  assert float(metrics["update_skipped"]) == 0
  # The step's teacher is the EMA of step 0 (= the student): recompute the
  # teacher forward on that and compare its statistics exactly.
  ema0 = jax.tree.map(lambda p: p.astype(jnp.float32), s.state.params)
  _, _, want = s.pseudo(ema0, s.state.ema_batch_stats)
  for got, exp in zip(jax.tree.leaves(new_state.ema_batch_stats),
                      jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(exp), rtol=1e-5,
                               atol=1e-6)
  # ... which are not the student's new statistics, and did change.
  diffs = [float(jnp.abs(a - b).max()) for a, b in zip(
      jax.tree.leaves(new_state.ema_batch_stats),
      jax.tree.leaves(new_state.batch_stats))]
  assert max(diffs) > 1e-4
  moved = [float(jnp.abs(a - b).max()) for a, b in zip(
      jax.tree.leaves(new_state.ema_batch_stats),
      jax.tree.leaves(s.state.ema_batch_stats))]
  assert max(moved) > 1e-4


def test_teacher_bn_eval_mode_leaves_statistics_unchanged(setup):
  s = setup
  image = step_lib.normalize_image(s.batch["teacher_view"], s.config.model)
  forward = jax.jit(step_lib.teacher_forward, static_argnums=(0, 4))
  out_eval, stats = forward(s.model, s.state.ema_params,
                            s.state.ema_batch_stats, image, "eval")
  for a, b in zip(jax.tree.leaves(stats),
                  jax.tree.leaves(s.state.ema_batch_stats)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  out_train, _ = forward(s.model, s.state.ema_params,
                         s.state.ema_batch_stats, image, "train")
  assert float(jnp.abs(out_eval["cls_logits"] -
                       out_train["cls_logits"]).max()) > 0
  with pytest.raises(ValueError, match="teacher.bn_mode"):
    step_lib.teacher_forward(s.model, s.state.ema_params,
                             s.state.ema_batch_stats, image, "frozen")


def test_monitor_masks_never_change_the_loss(setup):
  # Same batch structure (no recompilation), different GT masks: every
  # loss and every metric but the monitor's own is bit-identical.
  s = setup
  _, real = s.step_fn(s.state, s.batch)
  other = dict(s.batch, monitor_masks=~s.batch["monitor_masks"])
  _, flipped = s.step_fn(s.state, other)
  assert float(real["pseudo_iou"]) != float(flipped["pseudo_iou"])
  for k in real:
    if k != "pseudo_iou":
      assert float(real[k]) == float(flipped[k]), k


def test_oracle_pseudo_labels_are_the_gt_masks():
  masks = np.zeros((2, 3, 4, 4), bool)
  masks[0, 0, 1:3, 1:3] = True
  masks[1, 2, :, :2] = True  # an invalid GT's mask never leaks in
  batch = {"monitor_masks": jnp.asarray(masks),
           "instance_valid": jnp.array([[True, True, False],
                                        [True, False, False]]),
           "example_valid": jnp.array([True, True])}
  got = step_lib.oracle_pseudo_labels(batch)
  np.testing.assert_array_equal(got["pseudo_flags"],
                                [[1, 1, 0], [1, 0, 0]])
  np.testing.assert_array_equal(got["pseudo_masks"][0, 0], masks[0, 0])
  assert not np.asarray(got["pseudo_masks"][1]).any()
  c = _config(**{"train.oracle_pseudo_labels": True})
  with pytest.raises(ValueError, match="monitor_pseudo_labels"):
    step_lib.make_train_step(None, None, None, c)
