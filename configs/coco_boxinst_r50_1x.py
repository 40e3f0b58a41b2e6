r"""BoxInst R-50-FPN 1x on COCO (AdelaiDet `BoxInst/MS_R_50_1x.yaml`).

  python -m boxseg_jax.convert --input=R-50.pkl --format=msra \
      --output=R-50.npz
  python -m boxseg_jax.main --config=configs/coco_boxinst_r50_1x.py \
      --workdir=gs://BUCKET/boxinst_r50_1x --config.init=R-50.npz \
      --config.data.train=coco:/data/coco:train2017 \
      --config.data.val=coco:/data/coco:val2017

Hardware: 8 accelerators (batch 16), 90k steps. Reference: mask AP 30.7 on
COCO val2017 (AdelaiDet README); not measured with this code yet.
"""

from boxseg_jax import config as config_lib


def get_config(arg=None):
  del arg
  c = config_lib.base_config()
  config_lib.use_coco_recipe(c, "1x")
  c.method = "boxinst"
  # BoxInst trains on the geometric view only (no colour augmentation).
  c.data.photometric = "none"
  # detectron2's aspect-ratio grouping with static shapes: landscape and
  # portrait batches on their own canvas (one compilation each).
  c.data.canvases = ((800, 1344), (1344, 800))
  return c
