r"""Demo: BoxInst + Peer-assisted Copy-paste on `shapes` (the paper's Tab. 6).

configs/demo_boxinst.py (data, model, schedule, seed, BoxInst's projection
and pairwise losses, the student evaluated) plus BoxSeg's Peer-assisted
Copy-paste: an EMA teacher (demo_boxteacher.py's settings) labels the GTs
with QAM pseudo masks and mask-quality scores that only feed PC (which
objects enter the per-device bank, which pixels of a peer are pasted); no
loss reads them. Pasted peers and occluded learners then train through
BoxInst's box terms (docs/methods.md).

  python -m boxseg_jax.main --config=configs/demo_boxinst_pc.py \
      --workdir=out/demo_boxinst_pc

Hardware: 2 CPU cores. Not measured yet.
"""

import importlib.util
import os


def get_config(arg=None):
  del arg
  spec = importlib.util.spec_from_file_location(
      "demo_boxteacher", os.path.join(os.path.dirname(__file__),
                                      "demo_boxteacher.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config()
  c.method = "boxinst_pc"
  c.pc.enabled = True
  c.train.panel_every_steps = 1000   # pasted batches in TensorBoard
  c.pc.ramp_steps = 500               # 10k of 90k steps, scaled
  # BoxInst is evaluated as itself: the student, FCOS scores.
  c.eval.use_teacher = False
  c.eval.rescore = False
  return c
