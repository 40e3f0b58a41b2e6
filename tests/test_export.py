"""``python -m boxseg_jax.export``: an inference-only Orbax checkpoint.

Export -> predict gives the same detections as the workdir; the export
holds params, BatchNorm statistics and the config, and no optimizer state.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import trained_tiny
from boxseg_jax import evaluate
from boxseg_jax import export
from boxseg_jax import predict
from boxseg_jax.train import inference_ckpt

pytestmark = pytest.mark.slow  # trains the shared tiny workdir once


def _leaves_equal(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  return all(np.array_equal(np.asarray(x), np.asarray(y))
             for x, y in zip(la, lb))


def test_export_predict_same_detections(tmp_path):
  workdir = trained_tiny.workdir()
  out = str(tmp_path / "export")
  res = subprocess.run(
      [sys.executable, "-m", "boxseg_jax.export", f"--workdir={workdir}",
       f"--output={out}"], cwd=trained_tiny.REPO, capture_output=True,
      text=True, timeout=600)
  assert res.returncode == 0, res.stderr[-3000:]
  assert json.loads(res.stdout.strip().splitlines()[-1])["step"] == 40
  assert sorted(os.listdir(out)) == ["config.json", "export.json", "state"]
  meta = ocp.StandardCheckpointer().metadata(os.path.join(out, "state"))
  tree = meta.item_metadata if hasattr(meta, "item_metadata") else meta
  assert sorted(dict(tree)) == ["batch_stats", "params"]  # no opt_state
  from_workdir = inference_ckpt.load_workdir(workdir)
  from_export = inference_ckpt.load_export(out)
  assert from_export.step == 40 and not from_export.teacher
  assert from_export.config == from_workdir.config
  assert from_export.class_names == ("ellipse", "rectangle", "triangle",
                                     "star")
  assert _leaves_equal(from_export.params, from_workdir.params)
  assert _leaves_equal(from_export.batch_stats, from_workdir.batch_stats)
  source = predict.image_source("coco:" + _shapes_as_coco(tmp_path))
  a = predict.predict(from_workdir, source, score_thresh=0.0,
                      progress=False)
  b = predict.predict(from_export, source, score_thresh=0.0,
                      progress=False)
  assert sum(len(p.results) for p in a) > 0
  assert [p.results for p in a] == [p.results for p in b]
  # evaluate --export gives the training run's numbers as well.
  evaluate.evaluate(from_export, str(tmp_path / "ev"))
  with open(os.path.join(workdir, "eval", "step_40.json")) as f:
    want = json.load(f)
  with open(tmp_path / "ev" / "eval" / "step_40.json") as f:
    assert json.load(f) == want
  with pytest.raises(FileExistsError):
    export.export(from_workdir, out)


def test_teacher_export(tmp_path):
  workdir = trained_tiny.workdir()
  teacher = inference_ckpt.load_workdir(workdir, step=20, teacher=True)
  student = inference_ckpt.load_workdir(workdir, step=20)
  assert not _leaves_equal(teacher.params, student.params)
  path = export.export(teacher, str(tmp_path / "t"))
  got = inference_ckpt.load_export(path)
  assert got.teacher and got.step == 20
  assert _leaves_equal(got.params, teacher.params)
  assert _leaves_equal(got.batch_stats, teacher.batch_stats)


def _shapes_as_coco(tmp_path):
  """A 3-image COCO folder of shapes val images (PNG files + JSON)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from boxseg_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  c = trained_tiny.tiny_config()
  src = pipeline.make_source("shapes:val", shapes_cfg=c.data.shapes,
                             role="val")
  root = tmp_path / "coco"
  os.makedirs(root / "annotations")
  os.makedirs(root / "s")
  images, anns = [], []
  for i in range(3):
    ex = src[i]
    Image.fromarray(ex["image"]).save(root / "s" / f"{i}.png")
    h, w = ex["image"].shape[:2]
    images.append({"id": 10 + i, "file_name": f"{i}.png", "height": h,
                   "width": w})
    for box, label in zip(ex["boxes"], ex["labels"]):
      x0, y0, x1, y1 = (float(v) for v in box)
      anns.append({"id": len(anns) + 1, "image_id": 10 + i,
                   "category_id": int(label) + 1, "iscrowd": 0,
                   "bbox": [x0, y0, x1 - x0, y1 - y0],
                   "area": (x1 - x0) * (y1 - y0)})
  cats = [{"id": k + 1, "name": n} for k, n in enumerate(src.class_names)]
  with open(root / "annotations" / "instances_s.json", "w") as f:
    json.dump({"images": images, "annotations": anns, "categories": cats}, f)
  return f"{root}:s"
