"""mask_ceiling: GT through the CondInst mask output path."""

import importlib.util
import os

import pytest

from boxseg_jax.tools import mask_ceiling

REPO = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))


def _tiny():
  spec = importlib.util.spec_from_file_location(
      "tiny", os.path.join(REPO, "configs", "tiny.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config()
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
