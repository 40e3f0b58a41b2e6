r"""BoxInst R-50-FPN 1x on COCO + Peer-assisted Copy-paste (paper Tab. 6).

  python -m boxseg_jax.main --config=configs/coco_boxinst_pc_r50_1x.py \
      --workdir=gs://BUCKET/boxinst_pc_r50_1x --config.init=R-50.npz \
      --config.data.train=coco:/data/coco:train2017 \
      --config.data.val=coco:/data/coco:val2017

configs/coco_boxinst_r50_1x.py (BoxInst's losses, no colour augmentation,
the student evaluated) with BoxSeg's PC as in configs/coco_boxseg_r50_1x.py:
an EMA teacher at the test scale (BoxTeacher's settings) labels the GTs
with QAM pseudo masks and mask-quality scores read only by PC (bank
admission, the pasted peers' pixels); no loss reads them
(docs/methods.md).

Hardware: 8 accelerators (batch 16), 90k steps. Not measured with this
code yet.
"""

from boxseg_jax import config as config_lib


def get_config(arg=None):
  del arg
  c = config_lib.base_config()
  config_lib.use_coco_recipe(c, "1x")
  c.method = "boxinst_pc"
  c.data.photometric = "none"
  c.teacher.view = "test_scale"
  c.teacher.bn_mode = "train"
  # Landscape / portrait canvases (one compilation each), the teacher's
  # test-scale view likewise.
  c.data.canvases = ((800, 1344), (1344, 800))
  c.teacher.canvases = ((800, 1344), (1344, 800))
  c.pc.enabled = True
  c.train.panel_every_steps = 5000   # pasted batches in TensorBoard
  c.pc.crop = (640, 640)
  return c
