r"""BoxSeg R-50-FPN 3x on COCO (QAM; configs/coco_boxseg_r50_1x.py).

  python -m boxseg_jax.main --config=configs/coco_boxseg_r50_3x.py \
      --workdir=gs://BUCKET/boxseg_r50_3x --config.init=R-50.npz

Hardware: 8 accelerators (batch 16), 270k steps (drops at 210k, 250k),
`strongv2` student augmentation. `:VARIANT` picks a row of
`config.BOXSEG_VARIANTS` (e.g. `:bpma`). Not measured with this code yet.
"""

import importlib.util
import os


def get_config(arg=None):
  spec = importlib.util.spec_from_file_location("boxseg", os.path.join(
      os.path.dirname(__file__), "coco_boxseg_r50_1x.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(",".join(["3x"] + ([arg] if arg else [])))
