"""``python -m boxseg_jax.predict``: overlay PNGs and COCO results JSON.

Photos of coco-mini val2017 (skipped when absent) and synthetic images of
odd sizes, aspects and colour modes, with the tiny trained model.
"""

import contextlib
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

import trained_tiny
from boxseg_jax import predict
from boxseg_jax.train import inference_ckpt

pytestmark = pytest.mark.slow  # trains the shared tiny workdir once


@pytest.fixture(scope="module")
def model():
  return inference_ckpt.load_workdir(trained_tiny.workdir())


def _check_results(preds, thresh):
  for p in preds:
    for r in p.results:
      assert r["score"] >= thresh
      x, y, w, h = r["bbox"]
      assert 0 <= x and 0 <= y and x + w <= p.width + 1e-3
      assert y + h <= p.height + 1e-3 and w > 0 and h > 0
      assert tuple(r["segmentation"]["size"]) == (p.height, p.width)
      assert r["category_id"] in (1, 2, 3, 4)


def test_coco_mini_photos(model, coco_mini, tmp_path):
  spec = f"coco:{coco_mini}:val2017"
  source = predict.first_images(predict.image_source(spec), 4)
  preds = predict.predict(model, source, score_thresh=0.05, progress=False)
  assert len(preds) == 4 and sum(len(p.results) for p in preds) > 0
  _check_results(preds, 0.05)
  out = str(tmp_path / "out")
  paths = predict.write_outputs(preds, out, class_names=model.class_names,
                                category_ids=model.category_ids)
  for p in preds:
    name = os.path.splitext(os.path.basename(p.path))[0] + ".png"
    with Image.open(os.path.join(out, name)) as im:
      assert im.size == (p.width, p.height) and im.mode == "RGB"
  # pycocotools loads the results, against the dataset and images.json.
  with contextlib.redirect_stdout(io.StringIO()):
    gt = COCO(os.path.join(coco_mini, "annotations",
                           "instances_val2017.json"))
    res = gt.loadRes(paths["predictions"])
    mine = COCO(paths["images"])
    res2 = mine.loadRes(paths["predictions"])
  assert len(res.getAnnIds()) == sum(len(p.results) for p in preds)
  assert len(res2.getAnnIds()) == len(res.getAnnIds())
  assert sorted(mine.getImgIds()) == sorted(p.image_id for p in preds)


def test_any_size_aspect_and_mode(model, tmp_path):
  rng = np.random.default_rng(0)
  folder = tmp_path / "imgs"
  os.makedirs(folder)
  sizes = {"wide.jpg": (40, 300, "RGB"), "tall.png": (210, 37, "RGB"),
           "gray.png": (50, 50, "L"), "rgba.png": (77, 120, "RGBA"),
           "big.jpg": (700, 500, "RGB")}
  for name, (h, w, mode) in sizes.items():
    c = {"RGB": 3, "L": 1, "RGBA": 4}[mode]
    arr = rng.integers(0, 255, (h, w, c), dtype=np.uint8)
    Image.fromarray(arr[..., 0] if c == 1 else arr, mode).save(folder / name)
  (folder / "notes.txt").write_text("not an image")
  source = predict.image_source(str(folder))
  assert len(source) == len(sizes)
  preds = predict.predict(model, source, score_thresh=0.0, progress=False)
  assert {os.path.basename(p.path): (p.height, p.width) for p in preds} == {
      n: (h, w) for n, (h, w, _) in sizes.items()}
  assert all(len(p.results) > 0 for p in preds)
  _check_results(preds, 0.0)
  # Higher thresholds keep a subset, in the same order.
  high = predict.predict(model, source, score_thresh=0.2, progress=False)
  for a, b in zip(preds, high):
    assert b.results == [r for r in a.results if r["score"] >= 0.2]
  none = predict.predict(model, source, score_thresh=1.01, progress=False)
  out = str(tmp_path / "none")
  predict.write_outputs(none, out, class_names=model.class_names,
                        category_ids=model.category_ids)
  assert len([f for f in os.listdir(out) if f.endswith(".png")]) == 5
  mask = mask_utils.decode(preds[0].results[0]["segmentation"])
  assert mask.shape == (preds[0].height, preds[0].width)


def test_command_line(tmp_path):
  workdir = trained_tiny.workdir()
  folder = tmp_path / "imgs"
  os.makedirs(folder)
  for i, (h, w) in enumerate([(64, 64), (30, 90)]):
    Image.fromarray(np.full((h, w, 3), 40 * i, np.uint8)).save(
        folder / f"im{i}.png")
  out = str(tmp_path / "out")
  res = subprocess.run(
      [sys.executable, "-m", "boxseg_jax.predict", f"--workdir={workdir}",
       f"--images={folder}/*.png", f"--output={out}", "--score_thresh=0.1"],
      cwd=trained_tiny.REPO, capture_output=True, text=True, timeout=600)
  assert res.returncode == 0, res.stderr[-3000:]
  summary = json.loads(res.stdout.strip().splitlines()[-1])
  assert summary["num_images"] == 2 and summary["score_thresh"] == 0.1
  assert sorted(os.listdir(out)) == ["im0.png", "im1.png", "images.json",
                                     "predictions.json"]
  with open(os.path.join(out, "predictions.json")) as f:
    assert all(r["score"] >= 0.1 for r in json.load(f))
  assert "predict" in res.stderr  # the progress bar
