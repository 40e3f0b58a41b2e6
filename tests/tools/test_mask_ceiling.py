"""mask_ceiling: GT through the CondInst mask output path."""

import json
import os
import subprocess
import sys

import pytest

from boxseg_jax import config_helpers
from boxseg_jax.tools import mask_ceiling

REPO = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))


def _tiny():
  c = config_helpers.load_config_file("tiny")
  c.data.shapes.num_val = 12
  return c


def test_stride_one_is_exact_and_stride_four_loses_detail():
  c = _tiny()
  exact = mask_ceiling.ceiling(c, stride=1)
  for mode in ("point", "area"):
    assert exact[mode]["bbox"]["AP"] == pytest.approx(100.0)
    assert exact[mode]["segm"]["AP"] == pytest.approx(100.0)
  coarse = mask_ceiling.ceiling(c, stride=4)
  for mode in ("point", "area"):
    assert coarse[mode]["bbox"]["AP"] == pytest.approx(100.0)
    assert 0.0 < coarse[mode]["segm"]["AP"] < 95.0


def test_cli_writes_json(tmp_path):
  out = tmp_path / "ceiling.json"
  subprocess.run([sys.executable, "-m", "boxseg_jax.tools.mask_ceiling",
                  "--config=configs/tiny.py", f"--output={out}"],
                 cwd=REPO, check=True, capture_output=True)
  data = json.loads(out.read_text())
  assert data["stride"] == 4
  assert data["point"]["bbox"]["AP"] == pytest.approx(100.0)
  assert 0.0 < data["area"]["segm"]["AP"] < 100.0


def test_box_only_val_and_bad_config_are_errors(tmp_path, write_tiny_coco):
  c = _tiny()
  c.data.val = write_tiny_coco(str(tmp_path), masks=False)
  with pytest.raises(ValueError, match=r"instances_s\.json: masks are "
                     "required"):
    mask_ceiling.ceiling(c)
  c = _tiny()
  c.loss.sizes_of_interest = (64, 128)
  with pytest.raises(ValueError, match=r"config\.loss\.sizes_of_interest"):
    mask_ceiling.ceiling(c)


def test_orientation_canvases_keep_every_image_exact(tmp_path,
                                                     write_oriented_coco):
  spec = write_oriented_coco(str(tmp_path), [(48, 64), (64, 48)] * 2)
  c = config_helpers.load_config_file("tiny", **{
      "data.val": spec, "data.canvases": ((64, 96), (96, 64)),
      "data.train_short_sizes": (48, 64), "data.test_short_size": 64})
  # Each orientation on its own canvas, resized as one canvas would: at
  # stride 1 the GT comes back exactly from both.
  exact = mask_ceiling.ceiling(c, stride=1)
  assert exact["point"]["segm"]["AP"] == pytest.approx(100.0)
