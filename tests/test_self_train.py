"""CutLER self-training (boxseg_jax/self_train.py): the merge rule by hand,
round configs, and the demo chain end to end on coco-mini photos."""

import json
import os

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from boxseg_jax import config_helpers
from boxseg_jax import self_train
from boxseg_jax.data import pipeline

H = W = 8


def _segm(rows, cols):
  m = np.zeros((H, W), np.uint8)
  m[rows, cols] = 1
  rle = mask_utils.encode(np.asfortranarray(m))
  rle["counts"] = rle["counts"].decode("ascii")
  return rle


def _box(rows, cols):
  return [cols.start, rows.start, cols.stop - cols.start,
          rows.stop - rows.start]


def _ann(ann_id, image_id, rows, cols):
  return {"id": ann_id, "image_id": image_id, "category_id": 1,
          "bbox": _box(rows, cols), "area": 0, "iscrowd": 0,
          "segmentation": _segm(rows, cols)}


def _pred(image_id, rows, cols, score):
  return {"image_id": image_id, "category_id": 1, "bbox": _box(rows, cols),
          "score": score, "segmentation": _segm(rows, cols)}


LEFT = (slice(0, 8), slice(0, 4))        # 32 px
LEFT_BIG = (slice(0, 8), slice(0, 5))    # IoU with LEFT 32 / 40 = 0.8
CORNER = (slice(6, 8), slice(6, 8))      # 4 px, disjoint from LEFT_BIG
TOP = (slice(0, 2), slice(0, 8))         # 16 px


def _previous():
  return {
      "info": {"description": "MaskCut"},
      "categories": [{"id": 1, "name": "fg", "supercategory": "fg"}],
      "images": [{"id": i, "file_name": f"{i}.png", "height": H, "width": W}
                 for i in (1, 2, 3, 4)],
      "annotations": [_ann(7, 1, *LEFT), _ann(8, 1, *CORNER),
                      _ann(9, 2, *TOP)],
  }


def test_merge_rule_by_hand():
  preds = [
      _pred(1, *LEFT_BIG, 0.9),   # kept: replaces LEFT (IoU 0.8 >= 0.5)
      _pred(1, *TOP, 0.69),       # below 0.7: dropped
      _pred(2, *LEFT, 0.5),       # below: image 2 keeps its old TOP
      _pred(3, *CORNER, 0.7),     # >= 0.7, image without old annotations
      _pred(5, *TOP, 0.99),       # not an image of the previous round
      _pred(4, slice(0, 0), slice(0, 0), 0.99),   # empty mask: dropped
  ]
  doc, stats = self_train.merge(_previous(), preds, score_thresh=0.7,
                                iou_thresh=0.5)
  assert stats == dict(predictions_kept=2, predictions_empty=1, old_kept=2,
                       old_replaced=1, images_carried_over=1, images_new=1)
  anns = doc["annotations"]
  # Image 1: its kept prediction, then the surviving old CORNER; image 2
  # carried over; image 3's prediction last. Ids renumbered from 1.
  assert [a["image_id"] for a in anns] == [1, 1, 2, 3]
  assert [a["id"] for a in anns] == [1, 2, 3, 4]
  assert [a["bbox"] for a in anns] == [
      _box(*LEFT_BIG), _box(*CORNER), _box(*TOP), _box(*CORNER)]
  assert anns[0]["score"] == 0.9 and "score" not in anns[1]
  assert [a["area"] for a in anns] == [40.0, 4.0, 16.0, 4.0]
  assert all(a["iscrowd"] == 0 and a["category_id"] == 1 for a in anns)
  assert all("width" not in a for a in anns)
  assert [i["id"] for i in doc["images"]] == [1, 2, 3, 4]   # 4: no anns
  assert "info" not in doc
  # The input document is unchanged.
  assert [a["id"] for a in _previous()["annotations"]] == [7, 8, 9]

  # A lower IoU bar also replaces CORNER? No: IoU(CORNER, LEFT_BIG) = 0.
  doc, stats = self_train.merge(_previous(), preds, score_thresh=0.7,
                                iou_thresh=0.0)
  assert stats["old_replaced"] == 2   # IoU 0 is not < 0: everything goes
  # The reference's quirks: area = box w * h, width / height swapped.
  tall = {"image_id": 3, "category_id": 1, "bbox": [0, 0, 2, 8],
          "score": 0.8, "segmentation": _segm(slice(0, 8), slice(0, 2))}
  prev = _previous()
  prev["images"][2].update(height=8, width=8)
  doc, _ = self_train.merge(prev, [tall], score_thresh=0.7,
                            area_quirk=True, swap_wh_quirk=True)
  new = [a for a in doc["annotations"] if a["image_id"] == 3][0]
  assert new["area"] == 16.0
  assert (new["width"], new["height"]) == (8, 8)
  # The merged file is a COCO file pycocotools reads.
  gt = COCO()
  gt.dataset = doc
  gt.createIndex()
  assert gt.annToMask(gt.anns[new["id"]]).sum() == 16


def test_score_threshold_and_round_configs(tmp_path):
  c = config_helpers.load_config_file("cutler_r50_selftrain")
  assert [round(self_train.score_threshold(c, t), 6) for t in (1, 2)] == [
      0.7, 0.65]
  r0 = self_train.round_config(c, str(tmp_path), 0)
  r1 = self_train.round_config(c, str(tmp_path), 1)
  assert r0.data.train_annotations == str(tmp_path / "round_0" /
                                          "pseudo.json")
  assert r0.cutler.droploss and r0.cutler.copy_paste_min_ratio == 0.3
  assert (r0.optim.base_lr, r0.train.num_steps) == (0.01, 160000)
  assert r0.optim.lr_boundaries == (80000,) and r0.optim.gamma == 0.02
  assert not r1.cutler.droploss and r1.cutler.copy_paste_min_ratio == 0.5
  assert (r1.optim.base_lr, r1.train.num_steps, r1.optim.gamma) == (
      0.005, 80000, 1.0)
  assert r1.init == str(tmp_path / "round_0")
  assert set(r1.init_keys) == {"backbone", "fpn", "fcos_head",
                               "mask_branch"}
  assert r0.optim.clip_type == "per_param" and r0.optim.clip_value == 1.0
  assert c.method == "cutler" and c.model.num_classes == 1


def _demo_config(coco_mini):
  c = config_helpers.load_config_file("demo_cutler", "tiny")
  c.data.train = c.data.val = f"coco:{coco_mini}:val2017"
  return c


def test_demo_chain_end_to_end_and_resume(coco_mini, tmp_path):
  c = _demo_config(coco_mini)
  work = str(tmp_path / "st")
  first = self_train.run(c, work, rounds=0)
  assert first["status"] == "done" and len(first["rounds"]) == 1
  # Restarted with more rounds: the finished round 0 is skipped.
  out = self_train.run(c, work, rounds=1)
  assert out["status"] == "done" and len(out["rounds"]) == 2
  assert out["rounds"][0] == first["rounds"][0]
  for t, rec in enumerate(out["rounds"]):
    assert rec["final_step"] == 3
    assert rec["compilations"] == 1        # copy-paste and DropLoss on
    assert {"bbox", "segm"} <= set(rec["eval"])
    path = os.path.join(work, f"round_{t}", "pseudo.json")
    gt = COCO(path)                        # loads in pycocotools
    assert len(gt.imgs) == 4 and gt.anns
    for ann in list(gt.anns.values())[:5]:
      assert gt.annToMask(ann).sum() > 0
    # ... and trains through coco: with the round's annotation file.
    src = pipeline.make_source(c.data.train, with_masks=True,
                               require_masks=True, annotation_file=path)
    assert len(src) == 4
    assert src.stats["instances"] + src.stats["bad_boxes"] == len(gt.anns)
  assert out["rounds"][0]["resumed_from"] == "scratch"
  assert out["rounds"][1]["resumed_from"] == "init"   # round 0's weights
  info = out["rounds"][1]["annotations"]
  assert info["round"] == 1 and info["predictions_kept"] > 0
  metrics = json.load(open(os.path.join(work, "round_0", "eval",
                                        "step_3.json")))
  assert metrics["num_predictions"] > 0
  assert metrics["bbox"]["AP"] is not None

  # A round killed before its marker resumes from its own checkpoint (here
  # at its last step: evaluated again, not retrained) and reuses its
  # pseudo.json.
  mtime = os.path.getmtime(os.path.join(work, "round_1", "pseudo.json"))
  os.remove(os.path.join(work, "round_1", "round.json"))
  resumed = self_train.run(c, work, rounds=1)
  assert resumed["rounds"][1]["resumed_from"] == "workdir"
  assert resumed["rounds"][1]["final_step"] == 3
  assert os.path.getmtime(os.path.join(work, "round_1",
                                       "pseudo.json")) == mtime
