"""COCO source: real coco-mini counts, and bad input named or counted."""

import json
import os

import numpy as np
from PIL import Image
import pytest

from boxseg_jax.data import coco


def test_coco_mini_train_counts(coco_mini):
  src = coco.CocoSource(str(coco_mini), "train2017")
  assert len(src) == 80
  # 739 annotations = 731 instances + 8 crowd regions (never instances).
  assert src.stats["instances"] + src.stats["crowd"] == 739
  assert src.stats["crowd"] == 8 and src.stats["instances"] == 731
  assert len(src.category_ids) == 80
  ex = src[0]
  assert ex["image"].dtype == np.uint8 and ex["image"].ndim == 3
  assert ex["boxes"].shape == (len(ex["labels"]), 4)


def test_coco_mini_masks_match_boxes(coco_mini):
  src = coco.CocoSource(str(coco_mini), "val2017", with_masks=True)
  ex = src[3]
  for m, b in zip(ex["masks"], ex["boxes"]):
    ys, xs = np.nonzero(m)
    # Polygon masks lie inside their (float) box, within a pixel.
    assert xs.min() >= b[0] - 1 and xs.max() <= b[2] + 1
    assert ys.min() >= b[1] - 1 and ys.max() <= b[3] + 1


def _write(root, images, anns, cats=({"id": 1, "name": "a"},)):
  os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
  os.makedirs(os.path.join(root, "s"), exist_ok=True)
  with open(os.path.join(root, "annotations", "instances_s.json"), "w") as f:
    json.dump({"images": images, "annotations": anns,
               "categories": list(cats)}, f)


def test_bad_input(tmp_path):
  root = str(tmp_path)
  rgb = np.zeros((20, 30, 3), np.uint8)
  os.makedirs(os.path.join(root, "s"), exist_ok=True)
  Image.fromarray(rgb).save(os.path.join(root, "s", "rgb.png"))
  Image.fromarray(rgb[..., 0]).save(os.path.join(root, "s", "gray.png"))
  Image.fromarray(np.zeros((20, 30, 4), np.uint8)).save(
      os.path.join(root, "s", "rgba.png"))
  Image.fromarray((np.arange(600).reshape(20, 30) * 100).astype(np.uint16)
                  ).save(os.path.join(root, "s", "deep.png"))
  with open(os.path.join(root, "s", "corrupt.jpg"), "wb") as f:
    f.write(b"not a jpeg at all")
  names = ["rgb.png", "gray.png", "rgba.png", "deep.png", "corrupt.jpg",
           "missing.jpg"]
  images = [{"id": i + 1, "file_name": n, "height": 20, "width": 30}
            for i, n in enumerate(names)]
  anns = [
      {"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 5, 5],
       "iscrowd": 0},
      {"id": 2, "image_id": 1, "category_id": 1, "bbox": [1, 1, 0, 5],
       "iscrowd": 0},                                       # degenerate
      {"id": 3, "image_id": 1, "category_id": 1, "bbox": [float("nan"), 1, 2,
                                                          2], "iscrowd": 0},
      {"id": 4, "image_id": 2, "category_id": 1, "bbox": [0, 0, 50, 50],
       "iscrowd": 0},                                       # clipped
      {"id": 5, "image_id": 2, "category_id": 1, "bbox": [0, 0, 5, 5],
       "iscrowd": 1},                                       # crowd
  ]
  _write(root, images, anns)
  src = coco.CocoSource(root, "s")
  assert src.stats["missing_files"] == 1 and len(src) == 5
  assert src.stats["bad_boxes"] == 2 and src.stats["crowd"] == 1
  np.testing.assert_allclose(src[1]["boxes"], [[0, 0, 30, 20]])
  for i in range(4):  # rgb, gray, rgba and 16-bit all decode to uint8 RGB
    img = src[i]["image"]
    assert img.shape == (20, 30, 3) and img.dtype == np.uint8
  assert src[3]["image"].max() == 255  # 16-bit rescaled, not truncated
  with pytest.raises(coco.BadImageError, match="corrupt.jpg"):
    src[4]  # pylint: disable=pointless-statement


def test_missing_field_is_named(tmp_path):
  root = str(tmp_path)
  _write(root, [{"id": 1, "file_name": "a.jpg", "height": 2, "width": 2}],
         [{"id": 9, "image_id": 1, "category_id": 1}])
  with pytest.raises(ValueError, match=r"annotations\[0\].*'bbox'"):
    coco.CocoSource(root, "s")


def test_unknown_category_is_named(tmp_path):
  root = str(tmp_path)
  _write(root, [{"id": 1, "file_name": "a.jpg", "height": 2, "width": 2}],
         [{"id": 9, "image_id": 1, "category_id": 5, "bbox": [0, 0, 1, 1]}])
  with pytest.raises(ValueError, match="category_id 5"):
    coco.CocoSource(root, "s")


def test_missing_annotation_file_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="instances_s.json"):
    coco.CocoSource(str(tmp_path), "s")
