"""visualize_data writes PNGs with both views, boxes and masks drawn."""

import os
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from boxseg_jax import config_helpers
from boxseg_jax.data import pipeline
from boxseg_jax.evaluation import panels
from boxseg_jax.tools import visualize_data
from boxseg_jax.train import loop

REPO = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))


def _load_config(name):
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location(
      name, os.path.join(REPO, "configs", f"{name}.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config()


def test_shapes_pngs(tmp_path):
  cfg = _load_config("tiny")
  paths = visualize_data.visualize(cfg, str(tmp_path), num_batches=2)
  assert len(paths) == 2 * cfg.data.batch_size
  img = np.asarray(Image.open(paths[0]))
  # Upscaled x2, two views side by side plus a caption strip.
  assert img.shape[1] == 2 * (2 * 96 + 8)
  # Box outlines use saturated class colours; check some are present.
  sat = img.max(-1).astype(int) - img.min(-1).astype(int)
  assert (sat > 200).sum() > 50


def test_render_draws_box_and_mask():
  image = np.full((32, 32, 3), 128, np.uint8)
  valid = np.ones((32, 32), bool)
  masks = np.zeros((1, 32, 32), bool)
  masks[0, 8:16, 8:16] = True
  out = np.asarray(visualize_data.render_view(
      image, valid, np.array([[4, 4, 20, 20]], np.float32), np.array([0]),
      np.array([True]), masks, ["a"]))
  col = panels.class_color(0)
  assert tuple(out[10, 4]) == col          # left edge of the box outline
  assert tuple(out[12, 12]) != (128, 128, 128)  # mask tinted
  assert tuple(out[25, 25]) == (128, 128, 128)  # outside untouched


def test_cli_with_override(tmp_path):
  out = subprocess.run(
      [sys.executable, "-m", "boxseg_jax.tools.visualize_data",
       "--config=configs/tiny.py", f"--output={tmp_path}",
       "--config.data.batch_size=1"], cwd=REPO, capture_output=True,
      text=True, check=True)
  assert "wrote 1 PNGs" in out.stdout
  bad = subprocess.run(
      [sys.executable, "-m", "boxseg_jax.tools.visualize_data",
       "--config=configs/tiny.py", f"--output={tmp_path}",
       "--config.data.batch_sise=1"], cwd=REPO, capture_output=True,
      text=True)
  assert bad.returncode != 0 and "batch_sise" in bad.stderr


def test_coco_mini_pngs(coco_mini, tmp_path):
  cfg = _load_config("tiny")
  cfg.data.train = f"coco:{coco_mini}:val2017"
  cfg.data.canvas = (416, 416)
  cfg.data.train_short_sizes = (320,)
  cfg.data.train_max_size = 416
  cfg.data.max_instances = 50
  paths = visualize_data.visualize(cfg, str(tmp_path), num_batches=1)
  assert len(paths) == cfg.data.batch_size
  assert np.asarray(Image.open(paths[0])).std() > 20


def test_bad_first_record_is_skipped(tmp_path, write_tiny_coco, caplog):
  cfg = _load_config("tiny")
  cfg.data.train = write_tiny_coco(str(tmp_path / "d"), corrupt_first=True)
  cfg.data.batch_size = 3
  paths = visualize_data.visualize(cfg, str(tmp_path / "out"))
  assert len(paths) == 3
  assert "skipping record 0" in caplog.text and "0.png" in caplog.text


def test_nothing_decodes_and_bad_config_are_errors(tmp_path,
                                                   write_lfs_pointer_coco):
  cfg = _load_config("tiny")
  write_lfs_pointer_coco(str(tmp_path / "d"), num=3)
  cfg.data.train = f"coco:{tmp_path / 'd'}:s"
  with pytest.raises(pipeline.InputError, match=r"data\.train=coco:.*: the "
                     "first 3 records could not be loaded"):
    visualize_data.visualize(cfg, str(tmp_path / "out"))
  cfg = _load_config("tiny")
  cfg.data.canvas = (96, 96, 96, 96)
  with pytest.raises(ValueError, match=r"config\.data\.canvas"):
    visualize_data.visualize(cfg, str(tmp_path / "out"))


def test_student_batches_of_a_pc_run_in_tensorboard_and_pngs(tmp_path):
  # A 2-step BoxSeg + PC run (thresholds opened for the random teacher)
  # writes a panel of the pasted batch at step 1; visualize_data --workdir
  # renders the batches a step from its checkpoint trains on.
  config = config_helpers.load_config_file("tiny", "boxseg_pc", **{
      "train.num_steps": 2, "train.panel_every_steps": 1,
      "train.eval_at_end": False, "ckpt.every_steps": 2})
  workdir = str(tmp_path / "run")
  summary = loop.train_and_evaluate(config, workdir)
  assert summary["compilations"] == 1
  assert summary["last_metrics"]["pc_pasted"] > 0
  events = [f for f in os.listdir(workdir) if f.startswith("events")]
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  acc = event_accumulator.EventAccumulator(
      os.path.join(workdir, events[0]), size_guidance={"tensors": 0})
  acc.Reload()
  assert [e.step for e in acc.Tensors("train/student_batch")] == [1]

  paths = visualize_data.visualize_student(config, workdir,
                                           str(tmp_path / "png"), 1)
  assert len(paths) == config.data.batch_size
  white = []
  for path in paths:
    img = np.asarray(Image.open(path))
    assert img.shape[:2] == (2 * 96, 2 * (2 * 96 + 4))  # x2, two views
    is_white = (img == 255).all(-1)
    white.append((is_white[:, :2 * 96].sum(), is_white[:, 2 * 100:].sum()))
  # Peers outlined white on the pasted (right) views only.
  assert sum(r for _, r in white) > 0 and sum(l for l, _ in white) == 0


def test_workdir_without_a_checkpoint_is_named(tmp_path):
  config = config_helpers.load_config_file("tiny", "boxseg_pc")
  with pytest.raises(FileNotFoundError, match="no checkpoint"):
    visualize_data.visualize_student(config, str(tmp_path), str(tmp_path))
  with pytest.raises(ValueError, match="no teacher"):
    visualize_data.visualize_student(_load_config("tiny"), str(tmp_path),
                                     str(tmp_path))


def test_orientation_canvases_render_each_batch_on_its_canvas(
    tmp_path, write_oriented_coco):
  sizes = [(48, 64), (64, 48)] * 3
  spec = write_oriented_coco(str(tmp_path / "d"), sizes)
  cfg = config_helpers.load_config_file("tiny", **{
      "data.train": spec, "data.canvases": ((64, 96), (96, 64)),
      "data.train_short_sizes": (48, 64), "data.test_short_size": 64,
      "data.batch_size": 1})
  paths = visualize_data.visualize(cfg, str(tmp_path / "out"), num_batches=8)
  # Two views side by side (+8 px) above a 16-px caption, enlarged x2: the
  # PNG's size tells the batch's canvas; both orientations appear.
  shapes = {Image.open(p).size for p in paths}
  assert shapes == {(2 * (2 * 96 + 8), 2 * (64 + 16)),
                    (2 * (2 * 64 + 8), 2 * (96 + 16))}
