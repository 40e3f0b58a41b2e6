r"""Demo (smoke run, not a result): CutLER's whole chain on CPU in minutes.

MaskCut with a RANDOMLY initialised ViT-S/16 on the first 8 coco-mini val
photos (128 x 128 input, 8 x 8 patches, no CRF) -> round 0: a small
class-agnostic CondInst trained from scratch on those pseudo masks (dice,
DropLoss, copy-paste in the step) -> one self-training round (predict,
merge at score >= 0.7, retrain from round 0's weights), each round
evaluated class-agnostically (box and mask AP, every COCO category merged)
on the same 8 photos' real annotations:

  python -m boxseg_jax.self_train --config=configs/demo_cutler.py \
      --workdir=out/demo_cutler --rounds=1

Hardware: 2 CPU cores, a few minutes. Expected result: the chain runs and
every round's pseudo.json loads in pycocotools; the APs are near 0 and say
nothing about CutLER (random ViT features give meaningless MaskCut masks and
the detector starts from random weights). docs/cutler.md has the numbers.
"""

from boxseg_jax import config as config_lib

COCO_MINI = "../shared/data/coco-mini"
NUM_IMAGES = 8


def get_config(arg=None):
  """The demo; ``arg="tiny"``: the tests' few-second variant (4 photos,
  96 px canvas, a narrower model, 3 steps per round, 64 px MaskCut)."""
  c = config_lib.base_config()
  c.method = "cutler"
  c.data.train = f"coco:{COCO_MINI}:val2017"
  c.data.val = f"coco:{COCO_MINI}:val2017"
  c.data.num_train_images = NUM_IMAGES
  c.data.with_masks = True
  c.data.canvas = (128, 128)
  c.data.max_instances = 40
  c.data.train_short_sizes = (96, 112)
  c.data.train_max_size = 128
  c.data.test_short_size = 96
  c.data.test_max_size = 128
  c.data.photometric = "none"
  c.data.batch_size = 4
  c.data.eval_batch_size = 4

  config_lib.use_from_scratch_model(c)
  c.model.num_classes = 1
  c.model.resnet_num_blocks = (1, 1, 1, 1)
  c.model.resnet_width = 16
  c.model.fpn_channels = 64
  c.model.head_num_convs = 2
  c.model.mask_branch_channels = 64
  c.model.mask_branch_num_convs = 2
  c.model.mask_branch_out_channels = 8
  c.loss.mask_slots_per_image = 32

  c.optim.name = "adamw"
  c.optim.base_lr = 1e-3
  c.optim.weight_decay = 1e-4
  c.optim.warmup_steps = 20
  c.optim.lr_boundaries = ()
  c.train.num_steps = 200
  c.train.log_every_steps = 50
  c.train.eval_every_steps = 0
  c.ckpt.every_steps = 100
  c.ckpt.max_to_keep = 1

  c.eval.class_agnostic = True
  c.eval.num_images = NUM_IMAGES
  c.eval.num_panels = 0

  c.self_train.maskcut = "vit_small16,nocrf"
  c.self_train.maskcut_fixed_size = 128
  c.self_train.maskcut_random_init = True
  # The same budget and optimiser as round 0 (a plumbing check).
  c.self_train.base_lr = 1e-3
  c.self_train.num_steps = 200
  c.self_train.lr_boundaries = ()
  if arg == "tiny":
    _tiny(c)
  elif arg:
    raise ValueError(f"demo_cutler: unknown arg {arg!r} (tiny)")
  return c


def _tiny(c):
  c.data.num_train_images = c.eval.num_images = 4
  c.data.canvas = (96, 96)
  c.data.train_short_sizes = (80,)
  c.data.train_max_size = 96
  c.data.test_short_size = 80
  c.data.test_max_size = 96
  c.model.resnet_width = 8
  c.model.fpn_channels = 32
  c.model.head_num_convs = 1
  c.model.mask_branch_channels = 16
  c.model.mask_branch_num_convs = 1
  c.self_train.maskcut_fixed_size = 64
  c.train.num_steps = c.self_train.num_steps = 3
  c.train.log_every_steps = 1
  c.ckpt.every_steps = 3
  c.eval.boxfill_baselines = False
  # Round 1 keeps predictions of the barely trained round 0.
  c.self_train.score_thresh = 0.0
  c.self_train.score_thresh_step = 0.0
  # Every round, the evaluation and the prediction compile the same two
  # programs (the persistent XLA cache then serves the later ones): round
  # 1 keeps round 0's DropLoss and ratios, evaluation predicts as round 1.
  c.self_train.droploss = c.cutler.droploss
  c.self_train.copy_paste_min_ratio = c.cutler.copy_paste_min_ratio
  c.self_train.gamma = c.optim.gamma
  c.eval.max_detections = c.self_train.max_detections
  c.eval.score_thresh = c.self_train.predict_score_thresh
