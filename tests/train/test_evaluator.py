"""Evaluator: which AP types a val set supports is decided before training.

A box-only val JSON gets bbox AP only (pycocotools would crash on its
missing ``segmentation``/``area`` fields at the end of the run); a val set
with masks on some images gets segm AP on those images. The model is never
run here: ``predict`` is replaced by the GT itself.
"""

import importlib.util
import json
import logging
import os
import types

import pytest

from boxseg_jax import config_helpers
from boxseg_jax.data import pipeline
from boxseg_jax.train import evaluate as eval_lib
from boxseg_jax.train import models
from boxseg_jax.train import step as step_lib

REPO = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))


def _evaluator(tmp_path, val, **overrides):
  spec = importlib.util.spec_from_file_location(
      "tiny", os.path.join(REPO, "configs", "tiny.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config()
  c.data.val = val
  c.eval.num_panels = 0
  config_helpers.apply_overrides(c, overrides)
  return eval_lib.Evaluator(c, models.build_model(c), step_lib.make_mesh(-1),
                            str(tmp_path / "w"))


def _gt_as_predictions(evaluator, monkeypatch):
  preds = [{"image_id": a["image_id"], "category_id": a["category_id"],
            "bbox": a["bbox"], "score": 1.0}
           for a in evaluator.gt.dataset["annotations"]]
  monkeypatch.setattr(evaluator, "predict", lambda *a, **k: (preds, []))
  return types.SimpleNamespace(params=None, batch_stats=None)


def test_box_only_val_is_bbox_only_decided_at_construction(
    tmp_path, write_tiny_coco, caplog, monkeypatch):
  spec = write_tiny_coco(str(tmp_path / "d"), masks=False)
  with caplog.at_level(logging.WARNING):
    evaluator = _evaluator(tmp_path, spec)
  assert evaluator.plan == {"bbox": None}
  assert f"data.val={spec}: no annotation has a segmentation" in caplog.text
  metrics = evaluator.run(_gt_as_predictions(evaluator, monkeypatch), 3)
  assert set(metrics) == {"bbox"}
  assert metrics["bbox"]["AP"] == pytest.approx(100.0)
  with open(tmp_path / "w" / "eval" / "step_3.json") as f:
    assert "segm" not in json.load(f)


def test_val_with_masks_on_some_images_gets_segm_on_those(
    tmp_path, write_tiny_coco, caplog):
  root = tmp_path / "d"
  spec = write_tiny_coco(str(root))
  path = root / "annotations" / "instances_s.json"
  doc = json.loads(path.read_text())
  del doc["annotations"][0]["segmentation"]  # image 1 has no mask
  path.write_text(json.dumps(doc))
  with caplog.at_level(logging.WARNING):
    evaluator = _evaluator(tmp_path, spec)
  assert evaluator.plan["bbox"] is None
  mask_types = set(evaluator.plan) - {"bbox"}
  assert "segm" in mask_types
  assert all(evaluator.plan[t] == [2, 3, 4] for t in mask_types)
  assert "1 of 4 images have annotations without a segmentation" in \
      caplog.text


def test_val_with_masks_gets_every_type(tmp_path, write_tiny_coco):
  evaluator = _evaluator(tmp_path, write_tiny_coco(str(tmp_path / "d")))
  assert set(evaluator.plan) == set(evaluator.iou_types)
  assert all(ids is None for ids in evaluator.plan.values())


def test_two_canvases_group_the_val_images_by_orientation(
    tmp_path, write_oriented_coco):
  spec = write_oriented_coco(str(tmp_path / "d"),
                             [(48, 64), (64, 48), (64, 48), (48, 48)])
  evaluator = _evaluator(tmp_path, spec, **{
      "data.canvases": ((64, 96), (96, 64)),
      "data.train_short_sizes": (48, 64), "data.test_short_size": 64,
      "eval.num_images": 3})
  assert [t.canvas for t in evaluator.tcfgs] == [(64, 96), (96, 64)]
  # The first 3 images (a Subset): one landscape, two portrait.
  groups = pipeline.orientation_groups(evaluator.source, 2)
  assert [g.tolist() for g in groups] == [[0], [1, 2]]
  batches = list(pipeline.eval_batches(evaluator.source, evaluator.tcfgs,
                                       batch_size=2))
  assert [b["image"].shape[1:3] for b in batches] == [(64, 96), (96, 64)]
  assert [b["image_id"][b["example_valid"]].tolist() for b in batches] == [
      [1], [2, 3]]
