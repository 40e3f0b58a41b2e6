"""The BoxSeg (QAM) train step: pseudo labels from the teacher's pre-NMS
candidates reach the quality-weighted mask loss, and the step compiles once
(the teacher's forward is BoxTeacher's, whose missing gradient
tests/train/test_step.py checks).

One tiny model (configs/tiny.py) with the teacher's test-scale view on its
own canvas; thresholds are opened (candidate score 0, IoU 0, τ 0) so that a
randomly initialised teacher (σ(cls) ≈ the 0.01 prior) still labels GTs.
"""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from boxseg_jax import config_helpers
from boxseg_jax import config as config_lib
from boxseg_jax.data import features
from boxseg_jax.data import pipeline
from boxseg_jax.train import loop
from boxseg_jax.train import models
from boxseg_jax.train import optim
from boxseg_jax.train import step as step_lib


def _config():
  # Peer-assisted Copy-paste on, its admission opened to the random
  # teacher's labels (tests/methods/test_pc.py has the thresholds).
  return config_helpers.load_config_file("tiny", "boxseg_pc")


@pytest.fixture(scope="module")
def setup():
  config = _config()
  model = models.build_model(config)
  mesh = step_lib.make_mesh(1)
  abstract = jax.eval_shape(lambda: model.init(
      jax.random.PRNGKey(0), jnp.zeros((1,) + tuple(config.data.canvas) +
                                       (3,)), train=False))
  tx, schedule = optim.make_optimizer(
      config.optim, models.trainable_mask(config, abstract["params"]))
  state = loop.init_state(config, model, tx, mesh)
  state = state.replace(
      ema_params=jax.tree.map(lambda p: p * 1.01, state.ema_params))
  src = pipeline.make_source(config.data.train,
                             shapes_cfg=config.data.shapes, with_masks=True)
  tcfg = config_lib.transform_config(config, teacher_view=True)
  it = pipeline.TrainInput(src, tcfg, batch_size=config.data.batch_size,
                           seed=0)
  batches = [{k: jnp.asarray(v) for k, v in
              features.device_batch(next(it)).items()} for _ in range(2)]
  traces = [0]
  raw = step_lib.make_train_step(model, tx, schedule, config)

  def counted(s, b):
    traces[0] += 1
    return raw(s, b)

  return dict(config=config, model=model, state=state, batches=batches,
              step_fn=jax.jit(counted), traces=traces,
              labels_fn=jax.jit(step_lib.make_pseudo_label_fn(model,
                                                              config)))


def test_qam_labels_are_not_vacuous(setup):
  s = setup
  batch = s["batches"][0]
  labels, metrics, _ = s["labels_fn"](s["state"].ema_params,
                                      s["state"].ema_batch_stats, batch)
  gt_valid = np.asarray(batch["instance_valid"])
  n = s["config"].data.max_instances
  assert labels["pseudo_masks"].shape == (4, n, 24, 24)
  flags = np.asarray(labels["pseudo_flags"])
  assert (flags[gt_valid] > 0).mean() > 0.5
  assert not flags[~gt_valid].any()
  for key in ("pseudo_fraction", "pseudo_flag_mean", "pseudo_iou",
              "teacher_detections", "qam_candidates_per_gt"):
    assert key in metrics, key
  assert float(metrics["pseudo_fraction"]) > 0.5
  # No NMS: every pre-NMS candidate of the 128x128 teacher canvas counts.
  assert float(metrics["teacher_detections"]) > 100
  assert 1 <= float(metrics["qam_candidates_per_gt"]) <= 10


def test_step_compiles_once_and_trains_the_mask_loss(setup):
  s = setup
  state = s["state"]
  shapes = jax.tree.map(lambda x: (x.shape, x.dtype), state)
  pasted = stored = 0.0
  for batch in s["batches"]:
    state, metrics = s["step_fn"](state, batch)
    assert float(metrics["update_skipped"]) == 0
    assert float(metrics["loss_mask"]) > 0
    assert float(metrics["loss_mask_affinity"]) > 0
    assert float(metrics["num_pseudo_masks"]) > 0
    assert np.isfinite(float(metrics["loss_fcos_cls"]))
    pasted += float(metrics["pc_pasted"])
    stored += float(metrics["pc_stored"])
  assert s["traces"][0] == 1
  # PC ran inside the step: objects entered the bank and images were
  # pasted, and the state kept its shapes (the bank is fixed-size).
  assert jax.tree.map(lambda x: (x.shape, x.dtype), state) == shapes
  assert stored > 0 and pasted > 0


def test_preview_is_the_batch_the_step_trains_on(setup):
  s = setup
  # One step fills the bank; a preview from that state shows the paste a
  # step from it makes (same draws, same metrics), and leaves it alone.
  state, _ = s["step_fn"](s["state"], s["batches"][0])
  batch = s["batches"][1]
  preview = jax.jit(step_lib.make_preview_step(s["model"], s["config"]))
  out, pre_metrics = preview(state, batch)
  _, metrics = s["step_fn"](state, batch)
  for key in ("pc_pasted", "pc_attempted", "pc_stored", "pseudo_fraction"):
    assert float(pre_metrics[key]) == pytest.approx(float(metrics[key]))
  assert float(pre_metrics["pc_pasted"]) > 0
  n = s["config"].data.max_instances
  valid = np.asarray(out["instance_valid"])
  assert valid.shape[1] > n and valid[:, n:].any()     # the pasted peers
  changed = np.any(np.asarray(out["image"]) != np.asarray(batch["image"]),
                   axis=(1, 2, 3))
  assert (changed == valid[:, n:].any(1)).all()
  assert set(out) == set(step_lib.PREVIEW_KEYS) | {"input_image", "input_boxes",
                                                "input_valid"}
  np.testing.assert_array_equal(out["input_image"], batch["image"])
