"""Every config loads; overrides type-check; demo_masksup = demo + masks."""

import glob
import importlib.util
import os

import ml_collections
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(path):
  spec = importlib.util.spec_from_file_location(
      os.path.basename(path)[:-3], path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config()


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(
    REPO, "configs", "*.py"))))
def test_config_loads(path):
  c = load(path)
  assert isinstance(c, ml_collections.ConfigDict)
  if "data" in c:
    assert all(s % 32 == 0 for s in c.data.canvas)


def test_masksup_differs_from_demo_only_in_supervision():
  demo = load(os.path.join(REPO, "configs", "demo.py")).to_dict()
  sup = load(os.path.join(REPO, "configs", "demo_masksup.py")).to_dict()
  assert sup.pop("method") == "mask" and demo.pop("method") == "boxinst"
  assert sup["data"].pop("with_masks") and not demo["data"].pop("with_masks")
  assert sup == demo


def test_locked_config_rejects_unknown_keys():
  c = load(os.path.join(REPO, "configs", "tiny.py"))
  c.lock()
  with pytest.raises(AttributeError):
    c.data.batch_sise = 3
  with pytest.raises(TypeError):
    c.data.batch_size = "four"
