"""Shared test fixtures."""

import json
import os
import pathlib

import pytest

# Persistent XLA compilation cache shared by the test process and the
# trainer subprocesses it starts: each distinct program compiles once per
# machine instead of once per test. Set before jax is imported.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join("/tmp", f"boxseg_jax_xla_cache_{os.getuid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
# The suite's programs run a few steps each, so XLA:CPU's compile time is
# most of its time: LLVM at -O0 halves it (the tiny BoxTeacher step: 100 s
# -> 57 s on 2 cores) for slower steps. Subprocesses inherit it (their
# device-count flag is appended: tests/forced_devices.py). Set
# BOXSEG_TEST_XLA_OPT=1 to test the optimised code instead.
if os.environ.get("BOXSEG_TEST_XLA_OPT") != "1":
  os.environ["XLA_FLAGS"] = " ".join(filter(None, [
      os.environ.get("XLA_FLAGS", ""), "--xla_backend_optimization_level=0"]))

REPO = pathlib.Path(__file__).resolve().parents[1]
COCO_MINI = pathlib.Path(
    os.environ.get("BOXSEG_COCO_MINI", REPO.parent / "shared" / "data" / "coco-mini"))


@pytest.fixture
def coco_mini():
  """Path of ../shared/data/coco-mini; skips the test when it is absent."""
  if not (COCO_MINI / "annotations" / "instances_val2017.json").exists():
    pytest.skip(f"coco-mini not found at {COCO_MINI}")
  return COCO_MINI


def _write_lfs_pointer_coco(root, num=5):
  """A COCO folder whose image files are Git LFS pointer text files."""
  os.makedirs(os.path.join(root, "annotations"))
  os.makedirs(os.path.join(root, "s"))
  images, anns = [], []
  for i in range(num):
    name = f"{i}.jpg"
    with open(os.path.join(root, "s", name), "w") as f:
      f.write("version https://git-lfs.github.com/spec/v1\n"
              "oid sha256:0123\nsize 1234\n")
    images.append({"id": i + 1, "file_name": name, "height": 16,
                   "width": 16})
    anns.append({"id": i + 1, "image_id": i + 1, "category_id": 1,
                 "bbox": [1, 1, 5, 5], "iscrowd": 0})
  with open(os.path.join(root, "annotations", "instances_s.json"), "w") as f:
    json.dump({"images": images, "annotations": anns,
               "categories": [{"id": 1, "name": "x"}]}, f)


@pytest.fixture
def write_lfs_pointer_coco():
  """``fn(root, num=5)``: writes a COCO folder (split ``s``) of LFS pointers."""
  return _write_lfs_pointer_coco


def _write_tiny_coco(root, num=4, *, masks=True, corrupt_first=False,
                     size=64):
  """A COCO folder (split ``s``) of ``num`` PNGs with one rectangle each.

  4 categories (as configs/tiny.py); ``masks=False`` writes a box-only
  file (no ``segmentation``, no ``area``); ``corrupt_first`` makes the
  first image (id 1) an undecodable file. Returns the dataset name.
  """
  import numpy as np  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
  os.makedirs(os.path.join(root, "s"), exist_ok=True)
  images, anns = [], []
  for i in range(num):
    name = f"{i}.png"
    x0, y0 = 8 + 4 * i, 10 + 2 * i
    x1, y1 = x0 + 24, y0 + 20
    img = np.full((size, size, 3), 40, np.uint8)
    img[y0:y1, x0:x1] = (200, 60 + 40 * (i % 4), 30)
    path = os.path.join(root, "s", name)
    if corrupt_first and i == 0:
      with open(path, "wb") as f:
        f.write(b"\x89PNG truncated")
    else:
      Image.fromarray(img).save(path)
    images.append({"id": i + 1, "file_name": name, "height": size,
                   "width": size})
    ann = {"id": i + 1, "image_id": i + 1, "category_id": i % 4 + 1,
           "bbox": [x0, y0, x1 - x0, y1 - y0], "iscrowd": 0}
    if masks:
      ann["segmentation"] = [[x0, y0, x1, y0, x1, y1, x0, y1]]
      ann["area"] = float((x1 - x0) * (y1 - y0))
    anns.append(ann)
  cats = [{"id": k + 1, "name": f"c{k}"} for k in range(4)]
  with open(os.path.join(root, "annotations", "instances_s.json"), "w") as f:
    json.dump({"images": images, "annotations": anns, "categories": cats},
              f)
  return f"coco:{root}:s"


@pytest.fixture
def write_tiny_coco():
  """``fn(root, num=4, masks=True, corrupt_first=False)``: a tiny COCO."""
  return _write_tiny_coco


def _write_oriented_coco(root, sizes):
  """A COCO folder (split ``s``) of PNGs of the given ``(h, w)`` sizes.

  One rectangle (with its polygon mask) per image, inside any image of at
  least 40x40; 4 categories (as configs/tiny.py). Orientation canvases'
  tests mix landscape (``w >= h``) and portrait sizes. Returns the
  dataset name.
  """
  import numpy as np  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
  os.makedirs(os.path.join(root, "s"), exist_ok=True)
  images, anns = [], []
  for i, (h, w) in enumerate(sizes):
    name = f"{i}.png"
    x0, y0 = 4 + (4 * i) % 16, 4 + (2 * i) % 16
    x1, y1 = x0 + 20, y0 + 16
    img = np.full((h, w, 3), 40, np.uint8)
    img[y0:y1, x0:x1] = (200, 60 + 40 * (i % 4), 30)
    Image.fromarray(img).save(os.path.join(root, "s", name))
    images.append({"id": i + 1, "file_name": name, "height": h, "width": w})
    anns.append({"id": i + 1, "image_id": i + 1, "category_id": i % 4 + 1,
                 "bbox": [x0, y0, x1 - x0, y1 - y0], "iscrowd": 0,
                 "segmentation": [[x0, y0, x1, y0, x1, y1, x0, y1]],
                 "area": float((x1 - x0) * (y1 - y0))})
  cats = [{"id": k + 1, "name": f"c{k}"} for k in range(4)]
  with open(os.path.join(root, "annotations", "instances_s.json"), "w") as f:
    json.dump({"images": images, "annotations": anns, "categories": cats},
              f)
  return f"coco:{root}:s"


@pytest.fixture(scope="session")
def write_oriented_coco():
  """``fn(root, sizes)``: a COCO folder of images of the ``(h, w)`` sizes."""
  return _write_oriented_coco
