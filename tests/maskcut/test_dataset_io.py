"""Image lists, reference-style resizing and COCO JSON of the MaskCut CLI."""

import json
import os

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from boxseg_jax.maskcut import dataset_io


def _save(path, arr, mode=None):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(arr, mode).save(path) if mode else Image.fromarray(
      arr).save(path)


def test_list_images_glob(tmp_path):
  rng = np.random.default_rng(0)
  for name in ["a/img10.png", "a/img2.png", "b/x.png"]:
    _save(str(tmp_path / name), rng.integers(0, 255, (5, 6, 3), np.uint8))
  (tmp_path / "a" / "notes.txt").write_text("x")
  entries = dataset_io.list_images(str(tmp_path) + "/**/*.png")
  assert [e.file_name for e in entries] == ["a/img2.png", "a/img10.png",
                                            "b/x.png"]
  assert [e.image_id for e in entries] == [1, 2, 3]
  entries = dataset_io.list_images(str(tmp_path / "a" / "img*.png"))
  assert [e.file_name for e in entries] == ["img2.png", "img10.png"]
  with pytest.raises(FileNotFoundError, match="no files match"):
    dataset_io.list_images(str(tmp_path / "*.jpg"))


def test_list_images_coco(tmp_path):
  (tmp_path / "annotations").mkdir()
  doc = {"images": [{"id": 7, "file_name": "b.jpg", "width": 4, "height": 3},
                    {"id": 3, "file_name": "a.jpg", "width": 4, "height": 3}],
         "annotations": [], "categories": []}
  (tmp_path / "annotations" / "instances_val.json").write_text(
      json.dumps(doc))
  entries = dataset_io.list_images(f"coco:{tmp_path}:val")
  assert [(e.image_id, e.file_name) for e in entries] == [(3, "a.jpg"),
                                                          (7, "b.jpg")]
  assert entries[0].path == os.path.join(str(tmp_path), "val", "a.jpg")
  with pytest.raises(FileNotFoundError, match="instances_train.json"):
    dataset_io.list_images(f"coco:{tmp_path}:train")
  with pytest.raises(ValueError, match="coco:ROOT:SPLIT"):
    dataset_io.list_images("coco:onlyroot")


def test_load_resized_modes_and_sizes(tmp_path):
  rng = np.random.default_rng(1)
  gray = str(tmp_path / "g.png")
  _save(gray, rng.integers(0, 255, (30, 50), np.uint8))
  rgba = str(tmp_path / "c.png")
  _save(rgba, rng.integers(0, 255, (20, 10, 4), np.uint8), "RGBA")
  deep = str(tmp_path / "d.png")
  Image.fromarray(rng.integers(0, 65535, (9, 9)).astype(np.uint16)).save(deep)
  for path, wh in [(gray, (50, 30)), (rgba, (10, 20)), (deep, (9, 9))]:
    size_wh, img_s, img_f = dataset_io.load_resized(path, 64, 16)
    assert size_wh == wh
    assert img_s.shape == (64, 64, 3) and img_s.dtype == np.uint8
    np.testing.assert_array_equal(img_s, img_f)  # 64 is a multiple of 16
  # 72 / 16 = 4.5 -> rounds to 4 patches (Python round) -> 64.
  _, img_s, img_f = dataset_io.load_resized(gray, 72, 16)
  assert img_s.shape == (72, 72, 3) and img_f.shape == (64, 64, 3)
  bad = tmp_path / "bad.jpg"
  bad.write_bytes(b"\xff\xd8 truncated")
  with pytest.raises(ValueError, match="bad.jpg"):
    dataset_io.load_resized(str(bad), 64, 16)


def test_mask_annotation_and_json_load_in_pycocotools(tmp_path):
  mask = np.zeros((20, 30), bool)
  mask[3:9, 5:17] = True
  mask[12, 20] = True
  ann = dataset_io.mask_annotation(mask, 1, 5)
  assert ann["bbox"] == [5.0, 3.0, 16.0, 10.0]
  assert ann["area"] == 6 * 12 + 1
  assert isinstance(ann["segmentation"]["counts"], str)
  assert ann["segmentation"]["size"] == [20, 30]
  np.testing.assert_array_equal(
      mask_utils.decode({"size": [20, 30],
                         "counts": ann["segmentation"]["counts"].encode()}),
      mask)
  assert dataset_io.mask_annotation(np.zeros((4, 4), bool), 2, 5) is None
  entry = dataset_io.ImageEntry("/x/img.jpg", "img.jpg", 5)
  doc = dataset_io.coco_document(
      [dataset_io.image_info(entry, (30, 20))], [ann], "test")
  path = str(tmp_path / "out" / "pseudo.json")
  dataset_io.write_json(path, doc)
  assert os.listdir(tmp_path / "out") == ["pseudo.json"]
  gt = COCO(path)
  assert gt.getCatIds() == [1]
  assert gt.imgs[5]["width"] == 30 and gt.imgs[5]["height"] == 20
  np.testing.assert_array_equal(gt.annToMask(gt.anns[1]), mask)
  # The annotations double as detections: self-evaluation gives AP 1.
  dets = gt.loadRes([dict(a, score=1.0) for a in doc["annotations"]])
  ev = COCOeval(gt, dets, "segm")
  ev.evaluate()
  ev.accumulate()
  ev.summarize()
  assert ev.stats[0] == pytest.approx(1.0)


def test_glob_lists_each_file_once(tmp_path):
  rng = np.random.default_rng(0)
  for name in ["a/b/x.png", "a/y.png"]:
    _save(str(tmp_path / name), rng.integers(0, 255, (5, 6, 3), np.uint8))
  # `glob` returns a/b/x.png three times for this pattern.
  entries = dataset_io.list_images(str(tmp_path) + "/**/**/*.png")
  assert [e.file_name for e in entries] == ["a/b/x.png", "a/y.png"]
  assert [e.image_id for e in entries] == [1, 2]


def test_duplicate_image_ids_are_refused(tmp_path):
  (tmp_path / "annotations").mkdir()
  doc = {"images": [{"id": 3, "file_name": "a.jpg", "width": 4, "height": 3},
                    {"id": 3, "file_name": "b.jpg", "width": 4, "height": 3}],
         "annotations": [], "categories": []}
  (tmp_path / "annotations" / "instances_val.json").write_text(
      json.dumps(doc))
  with pytest.raises(ValueError, match=r"instances_val\.json: image id 3 is "
                     r"used by a\.jpg and b\.jpg"):
    dataset_io.list_images(f"coco:{tmp_path}:val")
  # Entries built by hand are checked before any work.
  from boxseg_jax.maskcut import generate  # pylint: disable=g-import-not-at-top
  entries = [dataset_io.ImageEntry("/x/a.jpg", "a.jpg", 1),
             dataset_io.ImageEntry("/x/b.jpg", "b.jpg", 1)]
  with pytest.raises(ValueError, match="image id 1 is used by a.jpg and "
                     "b.jpg"):
    generate.run(None, entries, None, str(tmp_path / "out.json"))
