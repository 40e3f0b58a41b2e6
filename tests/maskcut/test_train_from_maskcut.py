"""MaskCut JSON -> `coco:ROOT:SPLIT` -> our trainer (CutLER round 0 path)."""

import importlib.util
import os
import pathlib

import numpy as np

from boxseg_jax.data import pipeline
from boxseg_jax.maskcut import dataset_io
from boxseg_jax.maskcut import generate
from boxseg_jax.train import loop

REPO = pathlib.Path(__file__).resolve().parents[2]


def _load(name, arg=None):
  spec = importlib.util.spec_from_file_location(
      name, REPO / "configs" / f"{name}.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg) if arg else mod.get_config()


def test_trainer_trains_from_maskcut_json(coco_mini, tmp_path):
  cfg = _load("maskcut", "vit_small16,nocrf,lobpcg")
  cfg.fixed_size = 64
  cfg.batch_size = 3
  entries = dataset_io.list_images(f"coco:{coco_mini}:val2017")[:3]
  params = generate.load_params(cfg, None, random_init=True)
  root = tmp_path / "cutler"
  (root / "annotations").mkdir(parents=True)
  out = root / "annotations" / "instances_maskcut.json"
  stats = generate.run(cfg, entries, params, str(out), progress=False)
  assert stats["images"] == 3 and stats["annotations"] > 0
  os.symlink(coco_mini / "val2017", root / "maskcut")

  spec = f"coco:{root}:maskcut"
  source = pipeline.make_source(spec, with_masks=True)
  assert len(source) == 3 and source.class_names == ("fg",)
  assert source.stats["instances"] == stats["annotations"]

  c = _load("tiny")
  c.method = "mask"            # pseudo masks are full masks (reference §6.2)
  c.data.with_masks = True
  c.data.train = spec
  c.data.val = spec
  c.data.canvas = (128, 128)
  c.data.train_short_sizes = (96,)
  c.data.train_max_size = 128
  c.data.test_short_size = 96
  c.data.test_max_size = 128
  c.data.batch_size = 2
  c.data.eval_batch_size = 2
  c.model.num_classes = 1
  c.train.num_steps = 2
  c.train.log_every_steps = 1
  summary = loop.train_and_evaluate(c, str(tmp_path / "work"))
  assert summary["final_step"] == 2
  assert np.isfinite(summary["last_metrics"]["loss"])
  assert summary["last_metrics"]["loss_mask"] > 0
  assert {"bbox", "segm"} <= set(summary["eval"])  # + box-fill baselines
  assert (tmp_path / "work" / "eval" / "step_2.json").exists()
