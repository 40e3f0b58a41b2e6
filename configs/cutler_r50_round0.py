r"""CutLER round 0 on CondInst R-50-FPN: MaskCut pseudo masks of ImageNet.

Class-agnostic (1 class), mask-supervised CondInst (dice, reference §2.5)
on MaskCut's JSON, DropLoss (IoU 0.01) and copy-paste (ratio [0.3, 1.0]) in
the step, §6.4's schedule: batch 16, SGD lr 0.01, 160k steps, one drop at
80k by 0.02, weight decay 5e-5, per-parameter gradient clipping at norm 1
(detectron2's CLIP_TYPE norm), short side 240..1024 (max 1333), backbone
from DINO ResNet-50 (``config.init``: a converted .npz; the DINO converter
belongs to the weights issue), nothing frozen, BatchNorm in the ResNet
trained (the reference's SyncBN: our BN statistics are over the global
batch), RGB input with ImageNet mean/std. Evaluated class-agnostically on
COCO val2017 (CutLER's protocol).

  python -m boxseg_jax.maskcut --images='datasets/imagenet/train/**/*.JPEG' \
      --output=datasets/imagenet/annotations/maskcut_train.json \
      --weights=dino_vitbase8_pretrain.pth
  python -m boxseg_jax.main --config=configs/cutler_r50_round0.py \
      --workdir=gs://BUCKET/cutler/round_0 --config.init=dino_r50.npz

or the whole chain (round 0, then self-training rounds):
configs/cutler_r50_selftrain.py.

Hardware: 8 accelerators (batch 16), 160k steps. Expected result: the
CutLER paper reports class-agnostic COCO numbers for Cascade Mask R-CNN,
not CondInst; nothing is measured with this config here (no DINO weights,
no ImageNet).
"""

from boxseg_jax import config as config_lib

IMAGENET = "datasets/imagenet"
COCO = "datasets/coco"


def get_config(arg=None):
  del arg
  c = config_lib.base_config()
  c.method = "cutler"
  c.data.train = f"coco:{IMAGENET}:train"
  c.data.train_annotations = (
      f"{IMAGENET}/annotations/imagenet_train_fixsize480_tau0.15_N3.json")
  c.data.val = f"coco:{COCO}:val2017"
  c.data.with_masks = True
  c.data.train_short_sizes = (240, 320, 480, 640, 672, 704, 736, 768, 800,
                              1024)
  c.data.train_max_size = 1333
  c.data.batch_size = 16
  c.model.num_classes = 1

  # DINO ResNet-50 (torchvision layout): RGB, ImageNet mean/std, stride in
  # the 3x3, nothing frozen, BatchNorm trained.
  c.model.backbone_norm = "BN"
  c.model.freeze_at = 0
  c.model.stride_in_1x1 = False
  c.model.input_format = "RGB"
  c.model.pixel_mean = (123.675, 116.28, 103.53)
  c.model.pixel_std = (58.395, 57.12, 57.375)
  c.init_keys = ("backbone",)

  c.optim.name = "sgd"
  c.optim.base_lr = 0.01
  c.optim.weight_decay = 5e-5
  c.optim.warmup_steps = 1000
  c.optim.lr_boundaries = (80000,)
  c.optim.gamma = 0.02
  c.optim.clip_type = "per_param"
  c.optim.clip_value = 1.0
  c.train.num_steps = 160000
  c.train.eval_every_steps = 10000

  c.cutler.droploss = True
  c.cutler.droploss_iou_thresh = 0.01
  c.cutler.copy_paste = True
  c.cutler.copy_paste_min_ratio = 0.3
  c.cutler.copy_paste_max_ratio = 1.0
  c.eval.class_agnostic = True
  c.eval.max_detections = 100
  return c
