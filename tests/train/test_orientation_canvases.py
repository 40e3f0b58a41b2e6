"""Orientation canvases (``data.canvases``) in the trainer.

A tiny run on a COCO-style folder of landscape and portrait images compiles
``train_step`` once per canvas, resumes exactly, and evaluates on both
canvases; PC's bank shapes depend on ``pc.crop`` only and DropLoss takes
its locations from the batch's canvas.
"""

import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from boxseg_jax import config as config_lib
from boxseg_jax import config_helpers
from boxseg_jax import evaluate as evaluate_cli
from boxseg_jax import predict
from boxseg_jax.data import pipeline
from boxseg_jax.ops.locations import fcos_locations
from boxseg_jax.train import inference_ckpt
from boxseg_jax.train import loop
from boxseg_jax.train import step as step_lib

N = 4
CANVASES = ((64, 96), (96, 64))   # landscape, portrait
SIZES = [(48, 64), (64, 48)] * 4  # interleaved: grouping reorders them


def _config(spec, **overrides):
  c = config_helpers.load_config_file("tiny", **{
      "data.train": spec, "data.val": spec, "data.canvases": CANVASES,
      # Resized short side <= 64, long side <= 96: fits the canvases.
      "data.train_short_sizes": (48, 64), "data.test_short_size": 64,
      "train.num_steps": N, "train.log_every_steps": 1,
      "train.eval_at_end": False, "ckpt.every_steps": 2,
      "ckpt.max_to_keep": 10, "seed": 0, **overrides})
  return c


class _Records(logging.Handler):

  def __init__(self):
    super().__init__(logging.INFO)
    self.messages = []

  def emit(self, record):
    self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, write_oriented_coco):
  return write_oriented_coco(str(tmp_path_factory.mktemp("oriented")), SIZES)


@pytest.fixture(scope="module")
def straight(tmp_path_factory, dataset):
  """N steps in one go, then an evaluation on both canvases."""
  workdir = str(tmp_path_factory.mktemp("straight"))
  records, root = _Records(), logging.getLogger()
  level = root.level
  root.addHandler(records)
  root.setLevel(logging.INFO)
  try:
    summary = loop.train_and_evaluate(
        _config(dataset, **{"train.eval_at_end": True}), workdir)
  finally:
    root.removeHandler(records)
    root.setLevel(level)
  return summary, workdir, records.messages


def test_the_schedule_of_seed_0_uses_both_canvases_in_both_halves():
  # What the runs below rely on: steps 0-1 and 2-3 each see both canvases.
  groups = [pipeline.group_at_step(0, t, (4, 4)) for t in range(N)]
  assert set(groups[:2]) == set(groups[2:]) == {0, 1}


def test_one_compilation_per_canvas_and_an_evaluation(straight):
  summary, workdir, messages = straight
  assert summary["final_step"] == N
  assert summary["canvases_seen"] == sorted(CANVASES)
  assert summary["compilations"] == len(summary["canvases_seen"]) == 2
  compiled = [m for m in messages if m.startswith("train_step: compilation")]
  first = CANVASES[pipeline.group_at_step(0, 0, (4, 4))]
  assert compiled == [
      f"train_step: compilation 1, canvas {first[0]}x{first[1]}",
      f"train_step: compilation 2, canvas {first[1]}x{first[0]}"]
  assert not [m for m in messages if "recompiled" in m]
  assert all(np.isfinite(m["loss"]) for _, m in summary["history"])
  with open(os.path.join(workdir, "eval", f"step_{N}.json")) as f:
    written = json.load(f)
  assert {"bbox", "segm"} <= set(written)
  assert set(summary["eval"]) >= {"bbox", "segm"}


def test_resume_is_exact_with_two_canvases(straight, dataset, tmp_path):
  ref = straight[0]
  workdir = str(tmp_path)
  first = loop.train_and_evaluate(
      _config(dataset, **{"train.num_steps": N // 2}), workdir)
  assert first["compilations"] == 2
  assert first["canvases_seen"] == sorted(CANVASES)
  with open(os.path.join(workdir, "checkpoints", "input",
                         f"{N // 2}.p0.json")) as f:
    position = json.load(f)
  assert position["step"] == N // 2
  assert position["canvases"] == [list(c) for c in CANVASES]
  second = loop.train_and_evaluate(_config(dataset), workdir)
  assert second["resumed_from"] == "workdir"
  assert second["start_step"] == N // 2
  assert second["compilations"] == 2
  ref_losses = dict((s, m["loss"]) for s, m in ref["history"])
  for step, m in second["history"]:
    assert m["loss"] == pytest.approx(ref_losses[step], abs=1e-6), step
  assert [s for s, _ in second["history"]] == list(range(N // 2 + 1, N + 1))
  for x, y in zip(jax.tree.leaves(jax.device_get(
      (ref["state"].params, ref["state"].opt_state))),
                  jax.tree.leaves(jax.device_get(
                      (second["state"].params, second["state"].opt_state)))):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6,
                               rtol=0)


def test_predict_and_evaluate_a_two_canvas_run(straight, dataset, tmp_path):
  summary, workdir, _ = straight
  model = inference_ckpt.load_workdir(workdir)  # its config.json
  assert config_lib.canvases(model.config) == CANVASES
  folder = os.path.join(dataset.split(":")[1], "s")
  source = predict.image_source(folder)  # files: sizes from their headers
  preds = predict.predict(model, source, score_thresh=0.0, progress=False)
  # Batched by orientation, returned in the order of the images.
  assert [p.path for p in preds] == source.paths
  assert [(p.height, p.width) for p in preds] == [
      SIZES[int(os.path.basename(p)[:-4])] for p in source.paths]
  for p in preds:
    for r in p.results:
      assert tuple(r["segmentation"]["size"]) == (p.height, p.width)
  # The evaluate command reproduces the run's own evaluation.
  metrics = evaluate_cli.evaluate(model, str(tmp_path))
  assert os.path.exists(tmp_path / "eval" / f"step_{N}.json")
  for iou_type, values in summary["eval"].items():
    for k, v in values.items():
      assert metrics[iou_type][k] == pytest.approx(v, abs=1e-9, nan_ok=True)


def test_pc_bank_shapes_depend_on_the_crop_only():
  single = config_helpers.load_config_file("tiny", "boxseg_pc")
  two = config_helpers.load_config_file("tiny", "boxseg_pc", **{
      "data.canvases": CANVASES})
  key = jax.random.PRNGKey(0)
  shapes = [jax.tree.map(lambda x: (x.shape, x.dtype), jax.eval_shape(
      lambda c=c: step_lib.init_bank(c, 1, key))) for c in (single, two)]
  assert shapes[0] == shapes[1]
  assert step_lib.pc_crop(two) == (64, 64)
  two.pc.crop = ()  # the smallest height and width of the canvases
  assert step_lib.pc_crop(two) == (64, 64)
  two.pc.crop = (96, 64)
  with pytest.raises(ValueError, match=r"pc\.crop=\(96, 64\) is larger than "
                     r"the canvas \(64, 96\) \(data\.canvases="):
    step_lib.pc_config(two)


def test_droploss_locations_come_from_the_batch_canvas():
  c = config_helpers.load_config_file("tiny", **{"cutler.droploss": True})
  assert tuple(c.data.canvas) == (96, 96)
  weights = step_lib.METHODS["cutler"].location_weights(c)
  for h, w in CANVASES:
    num = fcos_locations(h, w).points.shape[0]
    batch = {"image": jnp.zeros((1, h, w, 3), jnp.uint8),
             "boxes": jnp.array([[[0.0, 0.0, 16.0, 16.0]]]),
             "instance_valid": jnp.ones((1, 1), bool),
             "example_valid": jnp.ones((1,), bool)}
    out = weights({"reg": jnp.zeros((1, num, 4))},
                  {"positive": jnp.zeros((1, num), bool)}, batch)
    assert out.shape == (1, num)
