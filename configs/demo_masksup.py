r"""Demo upper bound: configs/demo_boxinst.py with GT-mask supervision (dice).

Same data, model, schedule and budget as the box-supervised demo; the masks
it sees in training make it the ceiling the demo is compared against.

  python -m boxseg_jax.main --config=configs/demo_masksup.py \
      --workdir=out/demo_masksup
"""

import importlib.util
import os


def get_config(arg=None):
  spec = importlib.util.spec_from_file_location(
      "demo_boxinst", os.path.join(os.path.dirname(__file__),
                                   "demo_boxinst.py"))
  demo = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(demo)
  c = demo.get_config(arg)
  c.method = "mask"
  c.data.with_masks = True
  return c
