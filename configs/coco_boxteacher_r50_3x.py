r"""BoxTeacher R-50-FPN 3x on COCO (`coco/boxteacher_r50_3x.yaml`).

  python -m boxseg_jax.main --config=configs/coco_boxteacher_r50_3x.py \
      --workdir=gs://BUCKET/boxteacher_r50_3x --config.init=R-50.npz

Hardware: 8 accelerators (batch 16), 270k steps (drops at 210k, 250k),
`strongv2` student augmentation. Reference: mask AP 34.9 on COCO val2017,
35.0 test-dev (BoxTeacher README); not measured with this code yet.
"""

import importlib.util
import os


def get_config(arg=None):
  del arg
  spec = importlib.util.spec_from_file_location("bt", os.path.join(
      os.path.dirname(__file__), "coco_boxteacher_r50_1x.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config("3x")
