r"""Tiny config for tests: `shapes` at 64x64 on a 96x96 canvas, a small
CondInst trained from scratch, a few steps.

Command (CPU, under a minute):
  python -m boxseg_jax.main --config=configs/tiny.py --workdir=/tmp/tiny
"""

from boxseg_jax import config as config_lib


def get_config(arg=None):
  del arg
  c = config_lib.base_config()
  c.data.canvas = (96, 96)
  c.data.max_instances = 8
  c.data.train_short_sizes = (64, 72, 80)
  c.data.train_max_size = 96
  c.data.test_short_size = 64
  c.data.test_max_size = 96
  c.data.batch_size = 4
  c.data.eval_batch_size = 4
  c.data.shapes.num_train = 16
  c.data.shapes.num_val = 4
  c.data.shapes.image_size = (64, 64)
  c.data.shapes.min_size = 8.0
  c.data.shapes.max_size = 48.0
  c.data.shapes.max_objects = 4

  # A small CondInst trained from scratch (no pretrained weights here).
  config_lib.use_from_scratch_model(c)
  c.model.num_classes = 4
  c.model.resnet_num_blocks = (1, 1, 1, 1)
  c.model.resnet_width = 8
  c.model.fpn_channels = 32
  c.model.head_num_convs = 1
  c.model.mask_branch_channels = 16
  c.model.mask_branch_out_channels = 8
  c.model.mask_branch_num_convs = 1

  c.optim.warmup_steps = 2
  c.train.num_steps = 4
  c.train.log_every_steps = 2
  c.train.eval_every_steps = 0
  c.ckpt.every_steps = 2
  c.eval.num_panels = 1
  return c
