r"""Demo: BoxInst (boxes only) on the built-in `shapes` data, 2 CPU cores.

Trains a small CondInst from scratch with box supervision only (projection
+ colour-pairwise losses), then evaluates segm and bbox AP on `shapes:val`
against GT masks it never saw. The base of every demo: configs/demo.py
(BoxSeg, the README's main job), demo_boxteacher.py and demo_masksup.py
(the mask-supervised upper bound) change only the method on top of it.

  python -m boxseg_jax.main --config=configs/demo_boxinst.py \
      --workdir=out/demo_boxinst

Hardware: 2 CPU cores, about 10 minutes. docs/training.md has the numbers.
"""

from boxseg_jax import config as config_lib


def get_config(arg=None):
  del arg
  c = config_lib.base_config()
  c.method = "boxinst"

  c.data.train = "shapes"
  c.data.val = "shapes:val"
  c.data.canvas = (128, 128)
  c.data.max_instances = 12
  # One scale and no colour augmentation: BoxInst's own recipe has no
  # colour jitter (the strong student view belongs to BoxTeacher/BoxSeg),
  # and in a 10-minute run every augmentation slows convergence (measured:
  # docs/training.md).
  c.data.train_short_sizes = (128,)
  c.data.train_max_size = 128
  c.data.test_short_size = 128
  c.data.test_max_size = 128
  c.data.photometric = "none"
  c.data.batch_size = 8
  c.data.eval_batch_size = 8
  c.data.shapes.num_train = 20000
  c.data.shapes.num_val = 100
  c.data.shapes.image_size = (128, 128)
  c.data.shapes.min_size = 12.0
  c.data.shapes.max_size = 110.0

  # A small CondInst trained from scratch (no pretrained weights here).
  config_lib.use_from_scratch_model(c)
  c.model.num_classes = 4
  c.model.resnet_num_blocks = (1, 1, 1, 1)
  c.model.resnet_width = 16
  c.model.fpn_channels = 64
  c.model.head_num_convs = 2
  c.model.mask_branch_channels = 64
  c.model.mask_branch_num_convs = 2
  c.model.mask_branch_out_channels = 8

  # Shapes has no "wrong bottom rows" (a COCO annotation artefact).
  c.loss.bottom_pixels_removed = 0
  c.loss.pairwise_warmup_iters = 500
  # About 24 instances are selected per image here: 40 mask-head slots
  # instead of 64 make the step 18% faster; the few that do not fit are
  # counted in `mask_slots_overflow` (about 8 of ~195 per batch).
  c.loss.mask_slots_per_image = 40

  # From scratch, AdamW learns about twice as fast per step as SGD here
  # (measured: segm AP at 500 AdamW steps ~ at 1000 SGD steps).
  c.optim.name = "adamw"
  c.optim.base_lr = 1e-3
  c.optim.weight_decay = 1e-4
  c.optim.warmup_steps = 100
  c.optim.lr_boundaries = (3200, 3700)

  c.train.num_steps = 4000
  c.train.log_every_steps = 100
  c.train.eval_every_steps = 1000
  c.ckpt.every_steps = 500
  c.ckpt.max_to_keep = 2
  return c
