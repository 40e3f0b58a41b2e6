r"""BoxSeg R-50-FPN on Pascal VOC 2012 (the paper's QAM, 20 classes).

Convert VOC XML to the COCO layout first (boxseg_jax/tools/voc_to_coco.py;
docs/custom_data.md), then train:

  python -m boxseg_jax.tools.voc_to_coco --voc_root=VOCdevkit/VOC2012 \
      --split=train --output_root=data/voc2012
  python -m boxseg_jax.tools.voc_to_coco --voc_root=VOCdevkit/VOC2012 \
      --split=val --image_set=Segmentation --masks --output_root=data/voc2012
  python -m boxseg_jax.main --config=configs/voc_boxseg_r50.py \
      --workdir=gs://BUCKET/voc_boxseg_r50 --config.init=R-50.npz

Data: boxes of `coco:data/voc2012:train`, mask AP on the 1,449 VOC 2012
`val` images with instance masks. The papers' setting trains on the
10,582-image `train_aug` (VOC 2012 train + SBD); convert that list as its
own split and pass `--config.data.train=coco:data/voc2012:train_aug`.

Schedule: the only VOC schedule of the reference material, the authors'
own VOC run (§4C.9): batch 16, lr 0.01, 18k steps with drops at 12k and
16k, 100 warm-up steps, short side 480..800 in steps of 32 (max 1333);
everything else as configs/coco_boxseg_r50_1x.py (20 classes, where the
authors' run kept 80). `:VARIANT` picks a row of `config.BOXSEG_VARIANTS`.

Hardware: 8 accelerators (batch 16). Not measured with this code yet; the
paper reports VOC mask AP 39.5 (R-50) (Table 2).
"""

import importlib.util
import os


def get_config(arg=None):
  spec = importlib.util.spec_from_file_location("boxseg", os.path.join(
      os.path.dirname(__file__), "coco_boxseg_r50_1x.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config(arg)
  c.data.train = "coco:data/voc2012:train"
  c.data.val = "coco:data/voc2012:val"
  c.model.num_classes = 20
  c.data.max_instances = 50
  c.data.train_short_sizes = tuple(range(480, 801, 32))
  c.optim.warmup_steps = 100
  c.optim.lr_boundaries = (12000, 16000)
  c.train.num_steps = 18000
  c.train.eval_every_steps = 6000
  c.ckpt.every_steps = 2000
  return c
