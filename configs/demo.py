r"""Demo: BoxSeg (boxes only) on the built-in `shapes` data, 2 CPU cores.

The README's main job: trains a small CondInst from scratch with box
supervision only and evaluates segm and bbox AP on `shapes:val` against GT
masks it never saw. configs/demo_boxteacher.py (the BoxInst demo's data,
model, schedule and seed, plus the EMA teacher and its evaluation) with
BoxSeg's Quality-Aware Module: the teacher's pre-NMS candidates ranked by
box quality per GT (adaptive K), fused into a pseudo mask weighted by
quality, scored by Mask-Quality Scoring, and the varifocal classification
loss; and Peer-assisted Copy-paste: a per-device memory bank of
well-labelled isolated objects (whole 128x128 canvas crops) pasted into
the student view so that they overlap a learner object of their class,
inside the jitted step (docs/methods.md).

  python -m boxseg_jax.main --config=configs/demo.py --workdir=out/demo

`--config=configs/demo.py:VARIANT` trains a row of the ablation ladders
(`config.BOXSEG_VARIANTS`: Table 4 without PC no_pseudo, bpma, bqr,
bqr_qmf, bqr_qmf_mqs; Table 5 no_pc, pc_random, pc_hq_random_place,
pc_hq_overlap = full; fixed_k, qam_code; benchmarks/boxseg_ladder.py runs
them). BoxInst's own demo is configs/demo_boxinst.py, BoxInst + PC
configs/demo_boxinst_pc.py.

Hardware: 2 CPU cores, about 10 minutes. docs/training.md has the numbers.
"""

import importlib.util
import os

from boxseg_jax import config as config_lib


def get_config(arg=None):
  spec = importlib.util.spec_from_file_location(
      "demo_boxteacher", os.path.join(os.path.dirname(__file__),
                                      "demo_boxteacher.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config()
  config_lib.use_boxseg(c)
  # PC's 10k of 90k steps of paste-probability ramp, scaled to the run
  # like the other warm-ups.
  c.pc.ramp_steps = 500
  c.train.panel_every_steps = 1000   # pasted batches in TensorBoard
  if arg:
    config_lib.use_boxseg_variant(c, arg)
  return c
