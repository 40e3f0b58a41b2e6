r"""BoxTeacher R-50-FPN 1x on COCO (BoxTeacher `coco/boxteacher_r50_1x.yaml`).

  python -m boxseg_jax.convert --input=R-50.pkl --format=msra \
      --output=R-50.npz
  python -m boxseg_jax.main --config=configs/coco_boxteacher_r50_1x.py \
      --workdir=gs://BUCKET/boxteacher_r50_1x --config.init=R-50.npz \
      --config.data.train=coco:/data/coco:train2017 \
      --config.data.val=coco:/data/coco:val2017

Hardware: 8 accelerators (batch 16), 90k steps. Reference: mask AP 32.6 on
COCO val2017 (BoxTeacher README); not measured with this code yet.

`get_config("3x")` / `get_config("r101_3x")` are the 3x schedules
(configs/coco_boxteacher_r50_3x.py, configs/coco_boxteacher_r101_3x.py).
"""

from boxseg_jax import config as config_lib


def get_config(arg=None):
  variant = arg or "1x"
  if variant not in ("1x", "3x", "r101_3x"):
    raise ValueError(f"variant {variant!r}: 1x, 3x or r101_3x")
  c = config_lib.base_config()
  config_lib.use_coco_recipe(c, "1x" if variant == "1x" else "3x")
  c.method = "boxteacher"
  if variant == "r101_3x":
    c.model.depth = 101
  # Student view: `strong` colour augmentation (1x), `strongv2` (3x, adds
  # blur); the teacher sees the un-augmented image at the test scale.
  c.data.photometric = "strong" if variant == "1x" else "strongv2"
  c.teacher.view = "test_scale"
  c.teacher.bn_mode = "train"
  # Landscape / portrait canvases (one compilation each), the teacher's
  # test-scale view likewise.
  c.data.canvases = ((800, 1344), (1344, 800))
  c.teacher.canvases = ((800, 1344), (1344, 800))
  # BoxTeacher's own optimizer decays norm parameters too (§10.5).
  c.optim.weight_decay_norm = -1.0
  c.boxteacher.warmup_iters = 10000
  # Inference as the reference (§4.8): the teacher, rescored outputs.
  c.eval.use_teacher = True
  c.eval.rescore = True
  return c
