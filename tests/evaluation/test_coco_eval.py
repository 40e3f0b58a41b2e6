"""COCO evaluator: GT fed back scores 100, degraded predictions score lower."""

import json

import numpy as np
import pytest
from scipy import ndimage

from boxseg_jax.data import coco
from boxseg_jax.data import shapes
from boxseg_jax.evaluation import coco_eval


def _gt_predictions(gt, erode=0):
  preds = []
  for ann in gt.dataset["annotations"]:
    if ann.get("iscrowd", 0):
      continue
    img = gt.imgs[ann["image_id"]]
    m = coco.segmentation_to_mask(ann["segmentation"], img["height"],
                                  img["width"])
    bbox = ann["bbox"]
    if erode:
      m = ndimage.binary_erosion(m, iterations=erode)
      bbox = coco_eval.mask_to_box(m)
    preds.append({"image_id": ann["image_id"],
                  "category_id": ann["category_id"], "bbox": bbox,
                  "score": 1.0, "segmentation": coco_eval.encode_mask(m)})
  return preds


def test_coco_mini_gt_scores_100_and_eroded_lower(coco_mini, tmp_path):
  src = coco.CocoSource(str(coco_mini), "val2017")
  gt = coco_eval.gt_from_source(src)
  perfect = coco_eval.evaluate(gt, _gt_predictions(gt))
  for t in ("bbox", "segm"):
    for k in coco_eval.METRIC_NAMES:
      assert perfect[t][k] == pytest.approx(100.0), (t, k)
  degraded = coco_eval.evaluate(gt, _gt_predictions(gt, erode=3))
  assert degraded["segm"]["AP"] < 60.0
  assert degraded["bbox"]["AP"] < 90.0
  path = coco_eval.write_eval(str(tmp_path), 12, degraded)
  assert path.endswith("eval/step_12.json")
  with open(path) as f:
    data = json.load(f)
  assert data["step"] == 12
  assert data["segm"]["AP"] == pytest.approx(degraded["segm"]["AP"])
  assert "segm" in coco_eval.format_table(degraded)


def test_shapes_gt_roundtrip_and_missing_images():
  src = shapes.ShapesSource(6, seed=0,
                            cfg=shapes.ShapesConfig(image_size=(96, 96),
                                                    max_size=60.0))
  gt = coco_eval.gt_from_source(src)
  preds = _gt_predictions(gt)
  assert coco_eval.evaluate(gt, preds)["segm"]["AP"] == pytest.approx(100.0)
  # Drop every prediction of the first image: recall drops, no error.
  first = gt.getImgIds()[0]
  fewer = [p for p in preds if p["image_id"] != first]
  assert coco_eval.evaluate(gt, fewer)["segm"]["AP"] < 100.0
  # Restricting the evaluation to the other images brings it back to 100.
  others = [i for i in gt.getImgIds() if i != first]
  r = coco_eval.evaluate(gt, fewer, image_ids=others)
  assert r["bbox"]["AP"] == pytest.approx(100.0)


def test_no_predictions_is_zero():
  src = shapes.ShapesSource(2, seed=0,
                            cfg=shapes.ShapesConfig(image_size=(64, 64),
                                                    max_size=40.0))
  r = coco_eval.evaluate(coco_eval.gt_from_source(src), [])
  assert r["bbox"]["AP"] == 0.0 and r["segm"]["AP"] == 0.0


def test_wrong_score_order_lowers_ap():
  src = shapes.ShapesSource(4, seed=3,
                            cfg=shapes.ShapesConfig(image_size=(96, 96),
                                                    max_size=60.0))
  gt = coco_eval.gt_from_source(src)
  preds = _gt_predictions(gt)
  # Add a confident false positive in every image: precision drops.
  for img_id in gt.getImgIds():
    m = np.zeros((96, 96), np.uint8)
    m[0:5, 0:5] = 1
    preds.append({"image_id": img_id, "category_id": 1, "bbox": [0, 0, 5, 5],
                  "score": 2.0, "segmentation": coco_eval.encode_mask(m)})
  assert coco_eval.evaluate(gt, preds)["segm"]["AP"] < 100.0


def test_boxfill_variants_scored_from_their_own_keys():
  # GT: one rectangle mask per image; predictions carry a wrong mask under
  # "segmentation" and the exact rectangle under the box-fill keys.
  m = np.zeros((20, 30), np.uint8)
  m[4:12, 5:20] = 1
  gt = coco_eval.coco_from_dict({
      "images": [{"id": 1, "height": 20, "width": 30}],
      "annotations": [{"id": 1, "image_id": 1, "category_id": 1,
                       "bbox": [5, 4, 15, 8], "area": 120.0, "iscrowd": 0,
                       "segmentation": coco_eval.encode_mask(m)}],
      "categories": [{"id": 1, "name": "a"}]})
  wrong = np.zeros_like(m)
  wrong[0:3, 0:3] = 1
  pred = {"image_id": 1, "category_id": 1, "bbox": [5, 4, 15, 8],
          "score": 0.9, "segmentation": coco_eval.encode_mask(wrong),
          "segmentation_boxfill": coco_eval.encode_mask(m),
          "segmentation_boxfill_grid": coco_eval.encode_mask(m)}
  r = coco_eval.evaluate(gt, [pred], iou_types=(
      "bbox", "segm", "segm_boxfill", "segm_boxfill_grid"))
  assert r["segm"]["AP"] == 0.0
  assert r["segm_boxfill"]["AP"] == pytest.approx(100.0)
  assert r["segm_boxfill_grid"]["AP"] == pytest.approx(100.0)
  assert r["bbox"]["AP"] == pytest.approx(100.0)
  assert "segm_boxfill_grid" in coco_eval.format_table(r)


def test_box_only_annotation_file_gets_bbox_ap(tmp_path, write_tiny_coco):
  # No segmentation, area, iscrowd or annotation id: pycocotools needs the
  # last three even for bbox evaluation (KeyError: 'area' without them).
  root = str(tmp_path)
  write_tiny_coco(root, masks=False)
  path = tmp_path / "annotations" / "instances_s.json"
  doc = json.loads(path.read_text())
  for ann in doc["annotations"]:
    del ann["iscrowd"], ann["id"]
  path.write_text(json.dumps(doc))
  gt = coco_eval.gt_from_source(coco.CocoSource(root, "s"))
  anns = gt.dataset["annotations"]
  assert sorted(a["id"] for a in anns) == [1, 2, 3, 4]
  assert all(a["area"] == 24 * 20 and a["iscrowd"] == 0 for a in anns)
  preds = [{"image_id": a["image_id"], "category_id": a["category_id"],
            "bbox": a["bbox"], "score": 1.0} for a in anns]
  r = coco_eval.evaluate(gt, preds, iou_types=("bbox",))
  assert r["bbox"]["AP"] == pytest.approx(100.0)
