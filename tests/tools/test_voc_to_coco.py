"""Pascal VOC XML -> COCO JSON on a tiny synthetic VOC folder."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from boxseg_jax.data import coco
from boxseg_jax.tools import voc_to_coco

REPO = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))


def _xml(filename, w, h, objects, with_size=True):
  objs = "".join(
      f"<object><name>{n}</name><pose>Unspecified</pose>"
      f"<truncated>0</truncated><difficult>{d}</difficult><bndbox>"
      f"<xmin>{b[0]}</xmin><ymin>{b[1]}</ymin><xmax>{b[2]}</xmax>"
      f"<ymax>{b[3]}</ymax></bndbox></object>" for n, d, b in objects)
  size = (f"<size><width>{w}</width><height>{h}</height><depth>3</depth>"
          "</size>") if with_size else ""
  return (f"<annotation><folder>VOC2012</folder><filename>{filename}"
          f"</filename>{size}<segmented>0</segmented>{objs}</annotation>")


@pytest.fixture
def voc(tmp_path):
  root = tmp_path / "VOC2012"
  for d in ("Annotations", "JPEGImages", "ImageSets/Main",
            "ImageSets/Segmentation", "SegmentationObject"):
    os.makedirs(root / d)
  rng = np.random.default_rng(0)
  specs = {
      "2008_000001": (40, 30, [("dog", 0, (1, 1, 20, 10)),
                               ("person", 1, (5, 5, 30, 25))], True),
      "2008_000002": (50, 20, [("car", 0, (10, 2, 50, 20)),
                               ("car", 0, (9, 7, 7, 12)),   # degenerate
                               ("tvmonitor", 0, (45, 3, 60, 30))], False),
      "2008_000003": (16, 16, [], True),
  }
  for image_id, (w, h, objs, with_size) in specs.items():
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(
        root / "JPEGImages" / f"{image_id}.jpg")
    (root / "Annotations" / f"{image_id}.xml").write_text(
        _xml(f"{image_id}.jpg", w, h, objs, with_size))
  (root / "ImageSets/Main/train.txt").write_text(
      "2008_000001\n2008_000002\n2008_000003\n")
  (root / "ImageSets/Segmentation/val.txt").write_text("2008_000001\n")
  seg = np.zeros((30, 40), np.uint8)
  seg[2:8, 3:15] = 1     # the dog
  seg[10:20, 10:25] = 2  # the person
  seg[1, :] = voc_to_coco.VOID
  seg[2:8, 15] = voc_to_coco.VOID  # void border around the dog
  png = Image.fromarray(seg, "P")
  png.putpalette([v for i in range(256) for v in (i, 255 - i, i // 2)])
  png.save(root / "SegmentationObject" / "2008_000001.png")
  return str(root)


def test_boxes_categories_and_loader(voc, tmp_path):
  ds = voc_to_coco.convert(voc, "train")
  assert [c["name"] for c in ds["categories"]] == list(
      voc_to_coco.VOC_CLASSES)
  assert [c["id"] for c in ds["categories"]] == list(range(1, 21))
  assert [im["file_name"] for im in ds["images"]] == [
      "2008_000001.jpg", "2008_000002.jpg", "2008_000003.jpg"]
  # Size read from the image when the XML has none.
  assert (ds["images"][1]["height"], ds["images"][1]["width"]) == (20, 50)
  by_img = {}
  for a in ds["annotations"]:
    by_img.setdefault(a["image_id"], []).append(a)
  dog, person = by_img[1]
  assert dog["bbox"] == [0.0, 0.0, 20.0, 10.0]  # 1-based inclusive -> 0-based
  assert dog["category_id"] == 12 and dog["iscrowd"] == 0
  assert person["iscrowd"] == 0  # difficult kept by default
  car, tv = by_img[2]  # the degenerate car is dropped
  assert car["bbox"] == [9.0, 1.0, 41.0, 19.0]
  assert tv["bbox"] == [44.0, 2.0, 6.0, 18.0]  # clipped to the 50x20 image
  assert ds["stats"] == {"images": 3, "instances": 4, "difficult": 1,
                         "skipped_difficult": 0, "degenerate": 1,
                         "with_masks": 0}
  assert "segmentation" not in dog
  out = str(tmp_path / "out")
  path = voc_to_coco.write(ds, voc, out, "train")
  assert os.path.islink(os.path.join(out, "train"))
  src = coco.CocoSource(out, "train")  # the project's own loader
  assert len(src) == 3 and src.class_names[11] == "dog"
  ex = src[1]
  np.testing.assert_allclose(ex["boxes"], [[9, 1, 50, 20], [44, 2, 50, 20]])
  with open(path) as f:
    assert "stats" not in json.load(f)


def test_difficult_modes_and_classes(voc):
  skip = voc_to_coco.convert(voc, "train", difficult="skip")
  assert skip["stats"]["instances"] == 3
  assert skip["stats"]["skipped_difficult"] == 1
  crowd = voc_to_coco.convert(voc, "train", difficult="crowd")
  person = [a for a in crowd["annotations"] if a["category_id"] == 15][0]
  assert person["iscrowd"] == 1 and person["segmentation"] == [
      [4.0, 4.0, 30.0, 4.0, 30.0, 25.0, 4.0, 25.0]]
  auto = voc_to_coco.convert(voc, "train", classes="auto")
  assert [c["name"] for c in auto["categories"]] == ["car", "dog", "person",
                                                     "tvmonitor"]
  with pytest.raises(voc_to_coco.VocError,
                     match=r"2008_000001\.xml: class 'dog' is not one of"):
    voc_to_coco.convert(voc, "train", classes=("car", "person",
                                               "tvmonitor"))
  with pytest.raises(FileNotFoundError, match="ImageSets/Main/test.txt"):
    voc_to_coco.convert(voc, "test")


def test_instance_masks_and_command_line(voc, tmp_path):
  ds = voc_to_coco.convert(voc, "val", image_set="Segmentation", masks=True)
  assert ds["stats"]["with_masks"] == 1
  dog, person = ds["annotations"]
  m = mask_utils.decode(dog["segmentation"])
  want = np.zeros((30, 40), np.uint8)
  want[2:8, 3:15] = 1  # the void border (255) is not part of it
  np.testing.assert_array_equal(m, want)
  assert dog["area"] == 72.0
  assert mask_utils.decode(person["segmentation"]).sum() == 150
  out = str(tmp_path / "coco")
  res = subprocess.run(
      [sys.executable, "-m", "boxseg_jax.tools.voc_to_coco",
       f"--voc_root={voc}", "--split=val", "--image_set=Segmentation",
       "--masks", f"--output_root={out}", "--output_split=val_seg"],
      cwd=REPO, capture_output=True, text=True, timeout=120)
  assert res.returncode == 0, res.stderr[-2000:]
  summary = json.loads(res.stdout.strip().splitlines()[-1])
  assert summary["dataset"] == f"coco:{out}:val_seg"
  assert summary["instances"] == 2
  src = coco.CocoSource(out, "val_seg", with_masks=True)
  np.testing.assert_array_equal(src[0]["masks"][0], want)
  # A second run into the same root keeps the link; a clash is refused.
  voc_to_coco.write(ds, voc, out, "val_seg")
  os.remove(os.path.join(out, "val_seg"))
  os.makedirs(os.path.join(out, "val_seg"))
  with pytest.raises(FileExistsError):
    voc_to_coco.write(ds, voc, out, "val_seg")
