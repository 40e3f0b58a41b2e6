"""COCO source: real coco-mini counts, and bad input named or counted
(duplicate ids, malformed segmentations, empty files, unlisted images,
mask supervision without masks)."""

import json
import os

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
import pytest

from boxseg_jax.data import coco
from boxseg_jax.data import pipeline


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


def _png_images(root, names, h=20, w=30):
  os.makedirs(os.path.join(root, "s"), exist_ok=True)
  for n in names:
    Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(
        os.path.join(root, "s", n))
  return [{"id": i + 1, "file_name": n, "height": h, "width": w}
          for i, n in enumerate(names)]


def _box(ann_id, image_id=1, **extra):
  return dict({"id": ann_id, "image_id": image_id, "category_id": 1,
               "bbox": [1, 1, 5, 5], "iscrowd": 0}, **extra)


def test_duplicate_image_ids_are_named(tmp_path):
  root = str(tmp_path)
  images = _png_images(root, ["a.png", "b.png"])
  images[1]["id"] = 1  # two files, one id: b would train with a's boxes
  _write(root, images, [_box(1)])
  with pytest.raises(ValueError, match=r"instances_s\.json: 1 duplicate "
                     r"id\(s\) in 'images': id=1 occurs 2 times \(a\.png, "
                     r"b\.png\)"):
    coco.CocoSource(root, "s")


def test_duplicate_annotation_ids_are_named(tmp_path):
  root = str(tmp_path)
  _write(root, _png_images(root, ["a.png"]), [_box(7), _box(7)])
  with pytest.raises(ValueError, match=r"'annotations': id=7 occurs 2"):
    coco.CocoSource(root, "s")


@pytest.mark.parametrize("anns", [
    [],                                          # no annotations at all
    [_box(1, iscrowd=1), _box(2, bbox=[1, 1, 0, 3])],  # crowd + degenerate
    [_box(1, image_id=5)],                       # only on unlisted images
])
def test_no_usable_instance_is_an_error(tmp_path, anns):
  root = str(tmp_path)
  _write(root, _png_images(root, ["a.png"]), anns)
  with pytest.raises(ValueError, match=r"instances_s\.json: no usable "
                     "instance"):
    coco.CocoSource(root, "s")


def test_annotations_on_unlisted_images_are_counted_and_logged(tmp_path,
                                                               caplog):
  root = str(tmp_path)
  _write(root, _png_images(root, ["a.png"]),
         [_box(1), _box(2, image_id=40), _box(3, image_id=41)])
  src = coco.CocoSource(root, "s")
  assert src.stats["unlisted_annotations"] == 2
  assert src.stats["instances"] == 1
  assert "instances_s.json: 2 annotations point at image ids not in " \
         "'images'" in caplog.text and "[40, 41]" in caplog.text


@pytest.mark.parametrize("segm,problem", [
    ([[1, 2, 3]], "polygon with 3 numbers"),
    ([[1, 2, 3, 4]], "polygon with 4 numbers"),  # pycocotools: a box
    ([[1, 2, 3, 4, 5, 6, 7]], "polygon with 7 numbers"),
    ([["1", "2", "3", "4", "5", "6"]], "non-numeric"),
    ([[1, 2, 3, 4, 5, float("nan")]], "non-finite"),
    ([1, 2, 3, 4, 5, 6], "polygon is a int"),
    ("abc", "a str"),
    (7, "a int"),
    ({"size": [5, 5], "counts": [25]}, "RLE size [5, 5] differs"),
    ({"size": [20, 30], "counts": [1, 2]}, "sum to 3"),
    ({"size": [20, 30], "counts": [600.0]}, "non-negative ints"),
    ({"size": [20, 30], "counts": "ab\x01"}, "compressed RLE"),
    ({"counts": [600]}, "size"),
    ({"size": [20, 30], "counts": 5}, "RLE counts is a int"),
])
def test_malformed_segmentation_is_named(tmp_path, segm, problem):
  root = str(tmp_path)
  _write(root, _png_images(root, ["a.png"]),
         [_box(1), _box(3, segmentation=segm)])
  with pytest.raises(ValueError) as err:
    coco.CocoSource(root, "s")
  msg = str(err.value)
  assert "instances_s.json: annotation id=3 (image 1, a.png): malformed " \
         "'segmentation'" in msg
  assert problem in msg


def test_valid_segmentations_and_box_only_annotations(tmp_path):
  root = str(tmp_path)
  full = np.zeros((20, 30), np.uint8)
  full[2:6, 3:9] = 1
  rle = mask_utils.encode(np.asfortranarray(full))
  rle["counts"] = rle["counts"].decode("ascii")
  anns = [_box(1, segmentation=[[1, 1, 6, 1, 6, 6, 1, 6]]),
          _box(2, segmentation=rle),
          _box(3, segmentation={"size": [20, 30], "counts": [100, 500]}),
          _box(4, segmentation=[]), _box(5)]
  _write(root, _png_images(root, ["a.png"]), anns)
  src = coco.CocoSource(root, "s", with_masks=True)
  assert src.stats["no_segmentation"] == 2
  masks = src[0]["masks"]
  assert masks.shape == (5, 20, 30)
  np.testing.assert_array_equal(masks[1], full)
  assert masks[2].sum() == 500 and not masks[3:].any()


def test_mask_supervision_needs_segmentations(tmp_path):
  root = str(tmp_path)
  _write(root, _png_images(root, ["a.png", "b.png"]),
         [_box(1, segmentation=[[1, 1, 6, 1, 6, 6]]), _box(2, image_id=2)])
  coco.CocoSource(root, "s")  # boxes only: fine
  with pytest.raises(ValueError, match=r"instances_s\.json: masks are "
                     r"required .* 1 of 2 instances have no segmentation "
                     r"\(first: annotation id=2\)"):
    pipeline.make_source(f"coco:{root}:s", require_masks=True)


def test_invalid_json_is_named(tmp_path):
  os.makedirs(tmp_path / "annotations")
  (tmp_path / "annotations" / "instances_s.json").write_text('{"images": [')
  with pytest.raises(ValueError, match=r"instances_s\.json: invalid JSON"):
    coco.CocoSource(str(tmp_path), "s")


def test_size_mismatch_and_decompression_bomb_are_bad_images(tmp_path,
                                                             monkeypatch):
  root = str(tmp_path)
  images = _png_images(root, ["a.png", "b.png"])
  images[0]["height"] = 21  # the JSON disagrees with the file
  _write(root, images, [_box(1), _box(2, image_id=2)])
  src = coco.CocoSource(root, "s")
  with pytest.raises(coco.BadImageError, match=r"a\.png: decoded size "
                     "20x30 differs"):
    src[0]  # pylint: disable=pointless-statement
  # PIL refuses images over 2 * MAX_IMAGE_PIXELS before decoding them.
  monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
  with pytest.raises(coco.BadImageError, match=r"b\.png: cannot decode"):
    src[1]  # pylint: disable=pointless-statement
