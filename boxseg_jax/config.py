"""Default experiment config and the helpers that read its ``data`` part.

Every file in ``configs/`` starts from ``base_config()`` and overrides what
differs, so each key has exactly one default, here. Configs are locked by
absl's ``config_flags`` (``lock_config=True``): ``--config.data.canvas=...``
overrides work, a mistyped key fails loudly.
"""

import ml_collections

from boxseg_jax.data import transforms

# BoxTeacher / BoxInst COCO defaults (reference §7).
COCO_TRAIN_SHORT_SIZES = (640, 672, 704, 736, 768, 800)


def base_config() -> ml_collections.ConfigDict:
  """Defaults shared by all experiments (COCO-scale values)."""
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.data = ml_collections.ConfigDict()
  c.data.train = "shapes"          # dataset name (design.md)
  c.data.val = "shapes:val"
  c.data.tfds_data_dir = ""        # "" = TFDS default
  c.data.num_train_images = -1     # > 0: only the first N training images
  c.data.canvas = (1344, 1344)     # fixed padded (H, W), multiples of 32
  c.data.max_instances = 100
  c.data.train_short_sizes = COCO_TRAIN_SHORT_SIZES
  c.data.train_max_size = 1333
  c.data.test_short_size = 800
  c.data.test_max_size = 1333
  c.data.hflip_prob = 0.5
  c.data.photometric = "strong"    # none | weak | strong | strongv2
  c.data.with_masks = False        # GT masks in the train batch (mask sup.)
  c.data.batch_size = 16           # global, over all processes
  c.data.eval_batch_size = 8       # global
  c.data.num_threads = 2           # host threads per process
  c.data.prefetch_batches = 2
  # Stop with an error after this many undecodable training records in a
  # row (at most one pass over the shard; <= 0: one whole pass).
  c.data.max_consecutive_skips = 1000
  c.data.shapes = ml_collections.ConfigDict(dict(
      num_train=2000, num_val=200, seed=0, image_size=(320, 320),
      min_objects=1, max_objects=8, min_size=12.0, max_size=220.0))

  # What trains: "boxinst" (projection + pairwise, boxes only) or "mask"
  # (dice on GT masks: the fully supervised upper bound; needs
  # data.with_masks).
  c.method = "boxinst"

  c.model = ml_collections.ConfigDict()
  c.model.num_classes = 80
  c.model.depth = 50                  # ResNet-50 / 101
  c.model.resnet_num_blocks = ()      # () = standard for `depth`
  c.model.resnet_width = 64           # stem / res2 bottleneck width
  c.model.backbone_norm = "FrozenBN"  # FrozenBN (pretrained) | GN | BN
  c.model.stride_in_1x1 = True        # MSRA weights
  c.model.freeze_at = 2               # stem + res2 frozen
  c.model.fpn_channels = 256
  c.model.head_num_convs = 4
  c.model.prior_prob = 0.01
  c.model.box_quality = "ctrness"     # ctrness | iou
  c.model.mask_branch_channels = 128
  c.model.mask_branch_out_channels = 16
  c.model.mask_branch_num_convs = 4
  c.model.mask_head_channels = 8
  c.model.mask_head_num_layers = 3
  c.model.dtype = "float32"           # float32 | bfloat16 (compute)
  # detectron2 MSRA convention: BGR input, mean subtracted, std 1.
  c.model.input_format = "BGR"
  c.model.pixel_mean = (103.530, 116.280, 123.675)
  c.model.pixel_std = (1.0, 1.0, 1.0)

  c.loss = ml_collections.ConfigDict()
  c.loss.sizes_of_interest = (64, 128, 256, 512)
  c.loss.center_sampling_radius = 1.5
  c.loss.topk_proposals_per_im = 64
  # Static mask-head slots per image; 0 = topk_proposals_per_im (exact
  # reference). Smaller budgets suit sparse data; the instances that do
  # not fit are counted in the `mask_slots_overflow` metric.
  c.loss.mask_slots_per_image = 0
  c.loss.bottom_pixels_removed = 10
  c.loss.pairwise_size = 3
  c.loss.pairwise_dilation = 2
  c.loss.pairwise_color_thresh = 0.3
  c.loss.pairwise_warmup_iters = 10000

  c.teacher = ml_collections.ConfigDict()
  c.teacher.momentum = 0.999

  c.optim = ml_collections.ConfigDict()
  c.optim.name = "sgd"                # sgd | adamw
  c.optim.base_lr = 0.01
  c.optim.momentum = 0.9
  c.optim.weight_decay = 1e-4
  c.optim.weight_decay_norm = 0.0     # < 0: same as weight_decay
  c.optim.warmup_steps = 1000
  c.optim.warmup_factor = 0.001
  c.optim.lr_boundaries = (60000, 80000)
  c.optim.gamma = 0.1
  c.optim.clip_type = "none"          # none | per_param | global
  c.optim.clip_value = 1.0

  c.train = ml_collections.ConfigDict()
  c.train.num_steps = 90000
  c.train.log_every_steps = 20
  c.train.eval_every_steps = 10000    # 0: only at the end
  c.train.eval_at_end = True
  c.train.panel_every_steps = 0       # image panels (0: at evaluations)
  c.train.max_nonfinite_streak = 20
  c.train.num_devices = -1            # -1: all devices of the mesh

  c.eval = ml_collections.ConfigDict()
  c.eval.score_thresh = 0.05
  c.eval.pre_nms_topk = 1000
  c.eval.nms_thresh = 0.6
  c.eval.max_detections = 100
  c.eval.thresh_with_ctr = True
  c.eval.num_images = -1              # -1: the whole val set
  c.eval.use_teacher = False
  # BoxTeacher inference (reference §4.8): score = sqrt(c * mean mask prob).
  c.eval.rescore = False
  # Every evaluation also scores the same detections with each box filled
  # as its mask, crisp (segm_boxfill) and on the stride-4 mask grid through
  # the same paste-back (segm_boxfill_grid): what the masks must beat.
  c.eval.boxfill_baselines = True
  c.eval.num_panels = 4

  c.ckpt = ml_collections.ConfigDict()
  c.ckpt.every_steps = 5000
  c.ckpt.max_to_keep = 3
  c.ckpt.async_save = True

  # Partial initialisation when the workdir has no checkpoint: an Orbax
  # checkpoint directory (or a converted .npz) and the top-level parameter
  # subtrees to take from it (e.g. ("backbone",)).
  c.init = ""
  c.init_keys = ("backbone",)
  return c


def use_from_scratch_model(c: ml_collections.ConfigDict) -> None:
  """Settings for a CondInst trained without pretrained weights.

  GroupNorm in the backbone (an identity FrozenBN would leave the ResNet
  unnormalised), nothing frozen, RGB input with ImageNet mean/std.
  """
  c.model.backbone_norm = "GN"
  c.model.freeze_at = 0
  c.model.input_format = "RGB"
  c.model.pixel_mean = (123.675, 116.28, 103.53)
  c.model.pixel_std = (58.395, 57.12, 57.375)


def transform_config(config: ml_collections.ConfigDict, *,
                     masks="auto") -> transforms.TransformConfig:
  """The static transform parameters of ``config.data``.

  ``masks``: "auto" puts point-sampled GT masks in the batch iff
  ``data.with_masks``; None, "s4" or "full" force that mode.
  """
  d = config.data
  if masks == "auto":
    masks = "s4" if d.with_masks else None
  return transforms.TransformConfig(
      canvas=tuple(d.canvas), max_instances=d.max_instances,
      short_sizes=tuple(d.train_short_sizes), max_size=d.train_max_size,
      test_short_size=d.test_short_size, test_max_size=d.test_max_size,
      hflip_prob=d.hflip_prob, photometric=d.photometric, masks=masks)
