"""Class-agnostic COCO evaluation (CutLER's protocol): categories merged."""

import numpy as np

from boxseg_jax.evaluation import coco_eval


def _gt():
  masks = []
  for x0 in (0, 20):
    m = np.zeros((40, 40), np.uint8)
    m[5:15, x0:x0 + 10] = 1
    masks.append(m)
  anns = [{"id": i + 1, "image_id": 1, "category_id": cat,
           "bbox": [x0, 5, 10, 10], "area": 100.0, "iscrowd": 0,
           "segmentation": coco_eval.encode_mask(m)}
          for i, (cat, x0, m) in enumerate(zip((3, 7), (0, 20), masks))]
  data = {"images": [{"id": 1, "height": 40, "width": 40}],
          "annotations": anns,
          "categories": [{"id": 3, "name": "a"}, {"id": 7, "name": "b"}]}
  return coco_eval.coco_from_dict(data), masks


def test_merged_categories_score_any_label():
  gt, masks = _gt()
  # Both objects found exactly, each with the other's category.
  preds = [{"image_id": 1, "category_id": cat, "bbox": [x0, 5, 10, 10],
            "score": 0.9, "segmentation": coco_eval.encode_mask(m)}
           for cat, x0, m in zip((7, 3), (0, 20), masks)]
  per_class = coco_eval.evaluate(gt, preds)
  assert per_class["bbox"]["AP"] == 0.0 and per_class["segm"]["AP"] == 0.0
  agnostic = coco_eval.class_agnostic(gt)
  one = [dict(p, category_id=coco_eval.AGNOSTIC_CATEGORY["id"])
         for p in preds]
  merged = coco_eval.evaluate(agnostic, one)
  np.testing.assert_allclose(merged["bbox"]["AP"], 100.0)
  np.testing.assert_allclose(merged["segm"]["AP"], 100.0)
  assert agnostic.getCatIds() == [1] and len(agnostic.anns) == 2
  # The original ground truth is unchanged.
  assert sorted(a["category_id"] for a in gt.dataset["annotations"]) == [3,
                                                                          7]
