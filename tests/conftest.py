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
