r"""Tiny config for tests: `shapes` at 64x64 on a 96x96 canvas, a small
CondInst trained from scratch, a few steps.

Command (CPU, under a minute):
  python -m boxseg_jax.main --config=configs/tiny.py --workdir=/tmp/tiny

`configs/tiny.py:boxseg_pc`: BoxSeg (QAM labels, varifocal loss, the
teacher's test-scale view on a 128x128 canvas) with Peer-assisted
Copy-paste, thresholds opened (candidate score 0, IoU 0, tau 0, any mask
and box score) so that a randomly initialised teacher labels GTs and fills
the bank within a step.
"""

from boxseg_jax import config as config_lib


def get_config(arg=None):
  if arg not in (None, "", "boxseg_pc"):
    raise ValueError(f"configs/tiny.py: unknown argument {arg!r} "
                     "(expected boxseg_pc or none)")
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
  if arg == "boxseg_pc":
    _open_boxseg_pc(c)
  return c


def _open_boxseg_pc(c):
  c.method = "boxseg"
  c.loss.cls_loss = "varifocal"
  c.eval.score_thresh = 0.0
  c.qam.min_iou = 0.0
  c.qam.tau = 0.0
  c.boxteacher.warmup_iters = 1
  c.data.test_short_size = 80
  c.teacher.canvas = (128, 128)
  c.train.monitor_pseudo_labels = True
  c.pc.enabled = True
  c.pc.type = "segmentation"          # any class: pastes on 4 images
  c.pc.min_mask_score = -1.0
  c.pc.min_box_score = -1.0
  c.pc.min_area = 32.0
  c.pc.capacity = 4
  c.pc.crop = (64, 64)
