"""Default experiment config and the helpers that read its ``data`` part.

Every file in ``configs/`` starts from ``base_config()`` and overrides what
differs, so each key has exactly one default, here. Configs are locked by
absl's ``config_flags`` (``lock_config=True``): ``--config.data.canvas=...``
overrides work, a mistyped key fails loudly. ``validate(config)`` checks
what the lock cannot: the length and element types of every tuple field (an
override given twice, ``--config.data.canvas=96,96
--config.data.canvas=96,96``, is concatenated by ml_collections into a
4-tuple), and that orientation canvases (``data.canvases``,
``teacher.canvases``) hold what the resize makes; called by the trainer and
the tools before anything is built.
"""

import dataclasses
import logging
import math
from typing import Any, Callable, Optional, Tuple

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
  # A COCO JSON replacing coco:ROOT:SPLIT's own annotation file for training
  # (images still read from ROOT/SPLIT): MaskCut's or a self-training
  # round's pseudo masks ("" = ROOT/annotations/instances_SPLIT.json).
  c.data.train_annotations = ""
  c.data.canvas = (1344, 1344)     # fixed padded (H, W), multiples of 32
  # Orientation canvases ((H, W) landscape, (H, W) portrait): landscape
  # images (W >= H) train and evaluate on the first, portrait ones on the
  # second, one canvas per batch, one compilation per canvas (docs/data.md).
  # () = every image on data.canvas (which is ignored otherwise).
  c.data.canvases = ()
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

  # What trains (train/step.METHODS, docs/methods.md): "boxinst"
  # (projection + pairwise, boxes only), "mask" (dice on GT masks: the fully
  # supervised upper bound; needs data.with_masks), "boxteacher" (EMA
  # teacher, NMS + box-based assignment) or "boxseg" (EMA teacher, the
  # Quality-Aware Module `qam`).
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
  # Weight of the warmed-up pairwise term; the reference has none (1.0).
  c.loss.pairwise_weight = 1.0
  # FCOS classification: "focal" (one-hot targets) or "varifocal" (BoxSeg,
  # reference §4C.3: IoU-valued targets, w = t or alpha * sigma(z)^gamma).
  c.loss.cls_loss = "focal"
  c.loss.vfl_alpha = 0.25             # BoxSeg's code; VarifocalNet: 0.75
  c.loss.vfl_gamma = 2.0

  # The EMA teacher of the teacher-student methods (BoxTeacher, BoxSeg).
  c.teacher = ml_collections.ConfigDict()
  c.teacher.momentum = 0.999
  # "test_scale": the teacher sees the image at data.test_short_size /
  # test_max_size on its own canvas (the reference, §4.2); "same": the
  # student's geometry (cheaper, no resampling).
  c.teacher.view = "test_scale"
  c.teacher.canvas = ()               # () = data.canvas
  # With data.canvases: the test-scale view's canvas per orientation
  # (landscape, portrait), paired with the student's; () = teacher.canvas
  # for both, or (teacher.canvas = ()) the student's own canvases.
  c.teacher.canvases = ()
  # "train": mask-branch BN on the teacher batch's statistics, updating the
  # teacher's own running statistics (the reference's TEACHER_EVAL=False);
  # "eval": the teacher's running statistics, frozen.
  c.teacher.bn_mode = "train"

  # BoxTeacher (reference §4; MODEL.BOX_TEACHER.* defaults).
  c.boxteacher = ml_collections.ConfigDict()
  c.boxteacher.iou_thresh = 0.5
  c.boxteacher.score_thresh = 0.0
  c.boxteacher.assign_quirk = False   # True: the reference's off-by-one
  c.boxteacher.mask_threshold = 0.5
  c.boxteacher.mask_weight = 0.5
  c.boxteacher.warmup_iters = 10000
  c.boxteacher.affinity_thresh = 0.5
  c.boxteacher.affinity_weight = 0.1

  # BoxSeg's Quality-Aware Module (method "boxseg"; reference §4B paper,
  # §4C code; docs/methods.md has the paper-vs-code table). Paper defaults.
  c.qam = ml_collections.ConfigDict()
  c.qam.k_mode = "adaptive"           # adaptive (paper Eq. 4) | fixed (code)
  c.qam.k = 20                        # K of k_mode=fixed (the code's 20)
  c.qam.k_min = 2                     # K of GTs with side <= k_small
  c.qam.k_max = 10                    # K of GTs with side >= k_large
  c.qam.k_small = 32.0                # side sqrt(area), pixels
  c.qam.k_large = 96.0
  c.qam.k_interp = "sqrt"             # linear in the side | "area"
  c.qam.k_area = "original"           # GT area in original | resized pixels
  c.qam.min_iou = 0.5                 # IoU > it, after the top-K cut
  c.qam.class_agnostic = False        # False: candidate class == GT class
  # The class filter before the top-K cut (K counts the GT's own class)
  # or after it (`after_cut`, the code, where with adaptive K's K = 2 the
  # cut fills with wrong-class copies of the best boxes; docs/methods.md).
  c.qam.class_filter = "before_cut"
  c.qam.box_score = "cls"             # cls: sigma(cls) | fcos: c (the code)
  c.qam.tau = 0.1                     # fused candidates have box score > tau
  c.qam.fusion = "weighted"           # weighted | vote (code) | top1 | mean
  c.qam.mqs = "paper"                 # paper | code | mask_aware
  c.qam.mask_threshold = 0.5

  # BoxSeg's Peer-assisted Copy-paste (methods/pc.py; reference §4C.6, the
  # port's defaults §4C.8 rows 14-25; docs/methods.md). A per-device memory
  # bank in TrainState.bank; needs a method with pseudo labels.
  c.pc = ml_collections.ConfigDict()
  c.pc.enabled = False                # use_boxseg turns it on
  c.pc.type = "instance"              # instance (code configs) | segmentation
  #                                     | simple
  c.pc.capacity = 80                  # bank entries per device
  c.pc.crop = ()                      # entry crop (H, W); () = data.canvas
  #                                     (with data.canvases: their smallest
  #                                     H and W), fits every canvas
  c.pc.max_objects = 4                # objects stored per entry
  c.pc.iou_thresh = 0.1               # admission: IoU < it with other GTs
  c.pc.min_mask_score = 0.5           # admission: s > it
  c.pc.min_box_score = 0.5            # admission: mean box score > it
  c.pc.min_area = 300.0               # px: bank object, shifted peer, kept
  #                                     occluded target must exceed it
  c.pc.overlap_ratio = 0.1            # peer/learner overlap per axis
  c.pc.box_shift_thresh = 10.0        # px: occluded target kept if moved <=
  c.pc.rate = 0.7
  c.pc.ramp_steps = 10000
  c.pc.schedule = "code"              # code: P(paste) = 1 - rate*ramp |
  #                                     rampup: rate*ramp
  c.pc.placement = "overlap"          # overlap | random (anywhere)
  c.pc.peer = "best"                  # best (max s of the entry) | random
  c.pc.learner = "random"             # random GT of the class | lowest_s
  c.pc.color_view = "pasted"          # pasted | unpasted (the code's bug)

  # CutLER (method "cutler", methods/cutler.py; reference §6, docs/cutler.md):
  # DropLoss on the FCOS classification loss and copy-paste in the step.
  # Round 0 values; self-training rounds take theirs from c.self_train.
  c.cutler = ml_collections.ConfigDict()
  c.cutler.droploss = True
  c.cutler.droploss_iou_thresh = 0.01
  c.cutler.copy_paste = True
  c.cutler.copy_paste_rate = 1.0
  c.cutler.copy_paste_random_num = True  # [1, n-1] copies (never all)
  c.cutler.copy_paste_min_ratio = 0.3
  c.cutler.copy_paste_max_ratio = 1.0
  c.cutler.copy_paste_ioy_thresh = 0.5
  c.cutler.copy_paste_swap_xy_quirk = False  # True: the reference's bug

  # CutLER self-training (python -m boxseg_jax.self_train; reference §6.2,
  # §6.4): round t >= 1 predicts on the training images with round t-1,
  # merges with round t-1's annotations and trains from round t-1's weights.
  c.self_train = ml_collections.ConfigDict()
  c.self_train.score_thresh = 0.75    # kept predictions: score >= 0.75 -
  c.self_train.score_thresh_step = 0.05  # 0.05 t (0.7, 0.65)
  c.self_train.iou_thresh = 0.5       # old mask kept iff max IoU < it
  c.self_train.max_detections = 30    # TEST.DETECTIONS_PER_IMAGE
  c.self_train.predict_score_thresh = 0.0  # SCORE_THRESH_TEST
  c.self_train.area_quirk = False     # True: area = bbox w * h (reference)
  c.self_train.swap_wh_quirk = False  # True: width/height from size, swapped
  c.self_train.droploss = False
  c.self_train.copy_paste_min_ratio = 0.5
  c.self_train.copy_paste_max_ratio = 1.0
  c.self_train.base_lr = 0.005
  c.self_train.num_steps = 80000
  c.self_train.lr_boundaries = ()
  c.self_train.gamma = 1.0
  # Round 0's pseudo masks made by the command itself when
  # data.train_annotations is "" (MaskCut on data.train's images, limited
  # to data.num_train_images): a configs/maskcut.py arg ("" = off).
  c.self_train.maskcut = ""
  c.self_train.maskcut_fixed_size = 480
  c.self_train.maskcut_weights = ""   # DINO .pth; "" needs random_init
  c.self_train.maskcut_random_init = False

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
  # TensorBoard panels "train/student_batch" of what the student trains on
  # (pseudo masks, PC's pasted peers), every N steps: a second, smaller
  # program (step.make_preview_step), compiled on first use. 0: none.
  c.train.panel_every_steps = 0
  c.train.max_nonfinite_streak = 20
  c.train.num_devices = -1            # -1: all devices of the mesh
  # Teacher-student methods: log the pseudo masks' mean IoU with the GT
  # masks (needs a source with masks; they travel as `monitor_masks`, which
  # no loss reads).
  c.train.monitor_pseudo_labels = False
  # Diagnostic: train on the GT masks (flag 1) in place of the method's
  # pseudo masks (needs monitor_pseudo_labels): the ceiling of the
  # pseudo-label losses, to tell a weak teacher from a broken loss.
  c.train.oracle_pseudo_labels = False

  c.eval = ml_collections.ConfigDict()
  c.eval.score_thresh = 0.05
  c.eval.pre_nms_topk = 1000
  c.eval.nms_thresh = 0.6
  c.eval.max_detections = 100
  c.eval.thresh_with_ctr = True
  c.eval.num_images = -1              # -1: the whole val set
  c.eval.use_teacher = False
  # CutLER's protocol: every GT category merged into one ("object") and
  # every prediction scored against it, for box and mask AP.
  c.eval.class_agnostic = False
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


# Reference schedules (§7): iterations and LR drop steps at batch 16.
COCO_SCHEDULES = {"1x": (90000, (60000, 80000)),
                  "3x": (270000, (210000, 250000))}


def use_coco_recipe(c: ml_collections.ConfigDict, schedule: str = "1x",
                    root: str = "datasets/coco") -> None:
  """The reference COCO recipe (§7): data, SGD schedule, test scale.

  Batch 16, SGD lr 0.01 momentum 0.9, warm-up 1000 steps from 0.001x, the
  ``schedule``'s steps and drops, short side 640..800 (max 1333) for
  training and 800/1333 for testing, evaluation every 10k steps. The
  backbone is ResNet with FrozenBN, stem + res2 frozen, MSRA (BGR) weights
  given by ``--config.init`` (converted with ``python -m
  boxseg_jax.convert``).
  """
  steps, drops = COCO_SCHEDULES[schedule]
  c.data.train = f"coco:{root}:train2017"
  c.data.val = f"coco:{root}:val2017"
  c.data.batch_size = 16
  c.data.eval_batch_size = 8
  c.optim.name = "sgd"
  c.optim.base_lr = 0.01
  c.optim.warmup_steps = 1000
  c.optim.lr_boundaries = drops
  c.train.num_steps = steps
  c.train.eval_every_steps = 10000
  c.init_keys = ("backbone",)


def use_boxseg(c: ml_collections.ConfigDict) -> None:
  """BoxSeg's Quality-Aware Module on top of a teacher-student config.

  Method ``boxseg`` (QAM pseudo labels from the teacher's pre-NMS
  candidates, BoxTeacher's quality-weighted pixel and affinity losses), the
  varifocal classification loss (§4C.3), Peer-assisted Copy-paste
  (``c.pc``, §4C.6) and inference as the reference (the EMA teacher,
  mask-aware rescored outputs). ``c.qam`` and ``c.pc`` keep their defaults
  (§4C.8); ``use_boxseg_variant`` switches to ablations or to the public
  code's choices.
  """
  c.method = "boxseg"
  c.loss.cls_loss = "varifocal"
  c.eval.use_teacher = True
  c.eval.rescore = True
  c.pc.enabled = True
  # Panels of the pasted batches the student trains on (TensorBoard).
  c.train.panel_every_steps = 5000


# The paper's Table 4 ladder (no pseudo masks / BPMA / BQR / BQR+QMF /
# BQR+QMF+MQS, QAM alone: PC off), its Table 5 ladder (PC on top of QAM: no
# PC / random peers + random place / high-quality peers + random place /
# high-quality peers + overlapped), its Table 7 (adaptive K off) and the
# public code's QAM, as overrides of a BoxSeg config (everything else, the
# varifocal loss and the teacher inference included, stays the same across
# a ladder). docs/methods.md explains how each row is read.
_NO_PC = {"pc.enabled": False}
BOXSEG_VARIANTS = {
    # QAM (BQR + QMF + MQS, adaptive K) + PC: BoxSeg (the default).
    "full": {},
    # Table 4 (QAM alone). No pseudo masks: BoxInst's projection + pairwise
    # terms only.
    "no_pseudo": {"method": "boxinst", "train.monitor_pseudo_labels": False,
                  **_NO_PC},
    # BoxTeacher's NMS + box-based pseudo-mask assignment (§4.4).
    "bpma": {"method": "boxteacher", **_NO_PC},
    # Box-Quality Ranking alone: the best-ranked candidate's mask, flagged
    # with BoxTeacher's mask-aware score.
    "bqr": {"qam.fusion": "top1", "qam.mqs": "mask_aware", **_NO_PC},
    # + Quality-aware Masks Fusion.
    "bqr_qmf": {"qam.mqs": "mask_aware", **_NO_PC},
    # + Mask-Quality Scoring: the paper's QAM, without PC.
    "bqr_qmf_mqs": dict(_NO_PC),
    # Table 7: adaptive K off (the code's fixed top-20), without PC.
    "fixed_k": {"qam.k_mode": "fixed", "qam.k": 20, **_NO_PC},
    # Table 5 (QAM + PC). No PC (= bqr_qmf_mqs).
    "no_pc": dict(_NO_PC),
    # Random peers, random place: any isolated object large enough enters
    # the bank (no score thresholds), a random object of the entry is
    # pasted anywhere in the image.
    "pc_random": {"pc.min_mask_score": -1.0, "pc.min_box_score": -1.0,
                  "pc.peer": "random", "pc.placement": "random"},
    # High-quality peers (the admission thresholds, the entry's best
    # object), random place.
    "pc_hq_random_place": {"pc.placement": "random"},
    # High-quality peers overlapping their learner (= "full").
    "pc_hq_overlap": {},
    # Every QAM choice of the public code (§4C.8 rows 2, 7, 6, 9); PC as the
    # code (its only paper-vs-code difference in PC, row 24, reverted).
    "qam_code": {"qam.k_mode": "fixed", "qam.k": 20, "qam.box_score": "fcos",
                 "qam.fusion": "vote", "qam.mqs": "code",
                 "qam.class_filter": "after_cut",
                 "pc.color_view": "unpasted"},
}


def use_boxseg_variant(c: ml_collections.ConfigDict, name: str) -> None:
  """Applies ``BOXSEG_VARIANTS[name]`` to a BoxSeg config."""
  if name not in BOXSEG_VARIANTS:
    raise ValueError(f"BoxSeg variant {name!r}: expected one of "
                     f"{sorted(BOXSEG_VARIANTS)}")
  for key, value in BOXSEG_VARIANTS[name].items():
    node = c
    *path, last = key.split(".")
    for part in path:
      node = node[part]
    node[last] = value


def scaled_ema_momentum(num_steps: int, momentum: float = 0.999,
                        reference_steps: int = 90000) -> float:
  """The teacher EMA momentum of a shorter schedule, same relative horizon.

  The reference's 0.999 averages over ~1000 of its 90k steps (1.1% of the
  run); a 4000-step run keeping 0.999 would evaluate (and learn from) a
  teacher that mostly remembers its first quarter. The horizon
  ``1 / (1 - m)`` is scaled with the run length, like the warm-ups:
  ``m = 1 - 1 / max(horizon * num_steps / reference_steps, 1)``.
  """
  horizon = (1.0 / (1.0 - momentum)) * num_steps / reference_steps
  return 1.0 - 1.0 / max(horizon, 1.0)


def canvases(config: ml_collections.ConfigDict
             ) -> Tuple[Tuple[int, int], ...]:
  """The batch canvases: ``data.canvases`` (landscape, portrait) or, when
  it is (), the single ``(data.canvas,)``."""
  given = tuple(tuple(c) for c in config.data.canvases)
  return given or (tuple(config.data.canvas),)


def teacher_canvases(config: ml_collections.ConfigDict
                     ) -> Tuple[Tuple[int, int], ...]:
  """The teacher view's canvas of each student canvas (same orientation).

  ``teacher.canvases`` when given; otherwise, as with one canvas,
  ``teacher.canvas`` for every orientation, or (``teacher.canvas = ()``)
  the student's own canvases.
  """
  if config.teacher.canvases:
    return tuple(tuple(c) for c in config.teacher.canvases)
  single = tuple(config.teacher.canvas)
  return tuple(single or c for c in canvases(config))


def teacher_canvas(config: ml_collections.ConfigDict) -> Tuple[int, int]:
  """The teacher view's canvas of the first (or only) student canvas."""
  return teacher_canvases(config)[0]


def transform_configs(config: ml_collections.ConfigDict, *,
                      masks="auto", teacher_view: bool = False
                      ) -> Tuple[transforms.TransformConfig, ...]:
  """The static transform parameters of ``config.data``, one per canvas.

  One entry with a single canvas, two (landscape, portrait) with
  ``data.canvases``; the pipeline (``TrainInput``, ``eval_batches``) takes
  the tuple. ``masks``: "auto" puts point-sampled GT masks in the batch iff
  ``data.with_masks`` (as ``masks``) or ``train.monitor_pseudo_labels`` (as
  ``monitor_masks``, read by no loss); None, "s4" or "full" force that
  mode. ``teacher_view``: add the teacher's test-scale view (methods with a
  teacher and ``teacher.view = "test_scale"``) on the canvas of the same
  orientation (``teacher_canvases``).
  """
  d = config.data
  mask_key = "masks"
  if masks == "auto":
    masks = None
    if d.with_masks:
      masks = "s4"
    elif config.train.monitor_pseudo_labels:
      masks, mask_key = "s4", "monitor_masks"
  if teacher_view and config.teacher.view not in ("test_scale", "same"):
    raise ValueError(f"teacher.view={config.teacher.view!r}: expected "
                     "'test_scale' or 'same'")
  use_view = teacher_view and config.teacher.view == "test_scale"
  student = canvases(config)
  teacher = teacher_canvases(config)
  return tuple(transforms.TransformConfig(
      canvas=canvas, max_instances=d.max_instances,
      short_sizes=tuple(d.train_short_sizes), max_size=d.train_max_size,
      test_short_size=d.test_short_size, test_max_size=d.test_max_size,
      hflip_prob=d.hflip_prob, photometric=d.photometric, masks=masks,
      mask_key=mask_key, teacher_canvas=view if use_view else None)
               for canvas, view in zip(student, teacher))


def transform_config(config: ml_collections.ConfigDict, *,
                     masks="auto", teacher_view: bool = False,
                     canvas_index: Optional[int] = None
                     ) -> transforms.TransformConfig:
  """One canvas's transform parameters (``transform_configs``).

  Args:
    config: the experiment config.
    masks: as ``transform_configs``.
    teacher_view: as ``transform_configs``.
    canvas_index: which canvas (0 landscape, 1 portrait with
      ``data.canvases``); None: the only one.

  Raises:
    ValueError: ``canvas_index`` is None and ``data.canvases`` has two
      canvases (a caller that batches images of both orientations must
      take ``transform_configs``; one canvas would shrink the other
      orientation's images silently).
  """
  tcfgs = transform_configs(config, masks=masks, teacher_view=teacher_view)
  if canvas_index is None:
    if len(tcfgs) > 1:
      raise ValueError(
          f"data.canvases={canvases(config)}: this tool takes one canvas; "
          "set --config.data.canvases='()' (every image on data.canvas) to "
          "run it")
    canvas_index = 0
  return tcfgs[canvas_index]


@dataclasses.dataclass(frozen=True)
class _TupleRule:
  """What one tuple field of the config must hold."""
  what: str                             # for the message, e.g. "2 ints (H, W)"
  lengths: Optional[Tuple[int, ...]]    # allowed lengths; None: any
  kind: type                            # int, float (any real number) or str
  check: Optional[Callable[[tuple], bool]] = None  # extra rule on the values


def _increasing(v):
  return all(a < b for a, b in zip(v, v[1:]))


def _distinct(v):
  return len(set(v)) == len(v)


def _orientation_pair(v):
  """() or ((H, W) with W >= H, (H, W) with H >= W), multiples of 32."""
  sides_ok = all(x > 0 and x % 32 == 0 for c in v for x in c)
  return sides_ok and (not v or (v[0][1] >= v[0][0] and v[1][0] >= v[1][1]))


# Every tuple field of ``base_config()`` (tests/test_config.py checks that
# none is missing).
TUPLE_FIELDS = {
    "data.canvas": _TupleRule(
        "2 ints (H, W), positive multiples of 32", (2,), int,
        lambda v: all(x > 0 and x % 32 == 0 for x in v)),
    "data.canvases": _TupleRule(
        "() or 2 canvases ((H, W) landscape with W >= H, (H, W) portrait "
        "with H >= W), sides positive multiples of 32", (0, 2), tuple,
        _orientation_pair),
    "data.train_short_sizes": _TupleRule(
        "1 or more distinct positive ints", None, int,
        lambda v: len(v) >= 1 and all(x > 0 for x in v) and _distinct(v)),
    "data.shapes.image_size": _TupleRule(
        "2 positive ints (H, W)", (2,), int, lambda v: min(v) > 0),
    "pc.crop": _TupleRule(
        "() (= data.canvas) or 2 ints (H, W), positive multiples of 4",
        (0, 2), int, lambda v: all(x > 0 and x % 4 == 0 for x in v)),
    "teacher.canvas": _TupleRule(
        "() (= data.canvas) or 2 ints (H, W), positive multiples of 32",
        (0, 2), int, lambda v: all(x > 0 and x % 32 == 0 for x in v)),
    "teacher.canvases": _TupleRule(
        "() or 2 canvases ((H, W) landscape with W >= H, (H, W) portrait "
        "with H >= W), sides positive multiples of 32", (0, 2), tuple,
        _orientation_pair),
    "model.resnet_num_blocks": _TupleRule(
        "() or 4 positive ints (blocks of res2..res5)", (0, 4), int,
        lambda v: all(x > 0 for x in v)),
    "model.pixel_mean": _TupleRule("3 numbers (one per channel)", (3,),
                                   float),
    "model.pixel_std": _TupleRule("3 positive numbers (one per channel)",
                                  (3,), float, lambda v: min(v) > 0),
    "loss.sizes_of_interest": _TupleRule(
        "4 increasing positive numbers (bounds of the 5 FPN levels)", (4,),
        float, lambda v: v[0] > 0 and _increasing(v)),
    "self_train.lr_boundaries": _TupleRule(
        "increasing non-negative step ints", None, int,
        lambda v: all(x >= 0 for x in v) and _increasing(v)),
    "optim.lr_boundaries": _TupleRule(
        "increasing non-negative step ints", None, int,
        lambda v: all(x >= 0 for x in v) and _increasing(v)),
    "init_keys": _TupleRule(
        "distinct parameter subtree names (two: "
        "--config.init_keys=\"('backbone','fpn')\")", None,
        str, lambda v: all(x.isidentifier() for x in v) and _distinct(v)),
}


def _kind_ok(x: Any, kind: type) -> bool:
  if isinstance(x, bool):
    return False
  if kind is str:
    return isinstance(x, str)
  if kind is tuple:  # a canvas: 2 ints
    return (isinstance(x, (tuple, list)) and len(x) == 2 and
            all(_kind_ok(v, int) for v in x))
  if kind is int:
    return isinstance(x, int)
  return isinstance(x, (int, float)) and math.isfinite(x)


def _get(config: ml_collections.ConfigDict, path: str) -> Tuple[bool, Any]:
  node = config
  for key in path.split("."):
    if not isinstance(node, (ml_collections.ConfigDict, dict)) or (
        key not in node):
      return False, None
    node = node[key]
  return True, node


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the field when a tuple field is malformed.

  Checks every field of ``TUPLE_FIELDS`` present in ``config``: a tuple
  (or list) of the allowed length, elements of the right type and the
  field's own rule (e.g. canvas sides multiples of 32, increasing
  boundaries).
  """
  for path, rule in TUPLE_FIELDS.items():
    present, value = _get(config, path)
    if not present:
      continue
    ok = isinstance(value, (tuple, list))
    if ok:
      value = tuple(value)
      ok = ((rule.lengths is None or len(value) in rule.lengths) and
            all(_kind_ok(x, rule.kind) for x in value) and
            (rule.check is None or rule.check(value)))
    if not ok:
      raise ValueError(f"config.{path}={value!r}: expected {rule.what}"
                       f"{_repeat_hint(value, rule)}.{_example(path)}")
  if _get(config, "data.canvases")[0]:
    _check_canvases(config)


def _ceil32(x: int) -> int:
  return -(-x // 32) * 32


def _resize_bounds(short_sizes, max_size: int) -> Tuple[int, int]:
  """The largest (short, long) sides a ResizeShortestEdge output has."""
  return min(max(short_sizes), max_size), max_size


def _check_fit(path: str, given, short: int, long: int, sizes: str) -> None:
  """Each orientation canvas holds the largest resize of its orientation."""
  for i, (name, (h, w)) in enumerate(zip(("landscape", "portrait"), given)):
    short_side, long_side = (h, w) if i == 0 else (w, h)
    if short_side >= short and long_side >= long:
      continue
    need = ((_ceil32(short), _ceil32(long)) if i == 0 else
            (_ceil32(long), _ceil32(short)))
    raise ValueError(
        f"config.{path}[{i}]={(h, w)}: the {name} canvas must hold every "
        f"{name} image as the resize makes it ({sizes}: short side up to "
        f"{short}, long side up to {long}), so that no image is shrunk "
        f"further: at least {need}.")


def _check_canvases(config: ml_collections.ConfigDict) -> None:
  """``data.canvases`` / ``teacher.canvases`` fit what the resize makes."""
  d, t = config.data, config.teacher
  given = canvases(config) if d.canvases else ()
  if given:
    train = _resize_bounds(d.train_short_sizes, d.train_max_size)
    test = _resize_bounds((d.test_short_size,), d.test_max_size)
    _check_fit("data.canvases", given, max(train[0], test[0]),
               max(train[1], test[1]),
               "data.train_short_sizes / train_max_size and "
               "data.test_short_size / test_max_size")
  if not t.get("canvases") or t.get("view") != "test_scale":
    return
  if not given:
    raise ValueError(
        f"config.teacher.canvases={tuple(t.canvases)!r}: one teacher canvas "
        "per student canvas needs data.canvases; with a single data.canvas "
        "set teacher.canvas.")
  short, long = _resize_bounds((d.test_short_size,), d.test_max_size)
  _check_fit("teacher.canvases", teacher_canvases(config), short, long,
             "the teacher's test-scale view, data.test_short_size / "
             "test_max_size")


def _repeat_hint(value: Any, rule: _TupleRule) -> str:
  if not isinstance(value, tuple) or not value:
    return ""
  half = len(value) // 2
  repeated = len(value) % 2 == 0 and value[:half] == value[half:]
  if rule.lengths is not None and len(value) in rule.lengths:
    repeated = False  # a valid length (e.g. two equal canvases)
  too_long = rule.lengths is not None and len(value) > max(rule.lengths)
  if repeated or too_long:
    return (" (a tuple override given twice is concatenated by "
            "ml_collections: pass it once)")
  return ""


_EXAMPLES = {
    "data.canvases": "--config.data.canvases='((800,1344),(1344,800))'",
    "teacher.canvases": "--config.teacher.canvases='((800,1344),(1344,800))'",
}


def _example(path: str) -> str:
  if path in _EXAMPLES:
    return f" Example: {_EXAMPLES[path]}"
  default = _get(base_config(), path)[1]
  if not default:
    return ""
  return f" Example: --config.{path}=" + ",".join(str(x) for x in default)


def check_num_classes(config: ml_collections.ConfigDict, source,
                      field: str) -> None:
  """Checks ``model.num_classes`` against a dataset's categories.

  Fewer classes than categories is an error (labels >= num_classes would
  train as background for classification while box and mask losses still
  train on them); more is a warning (unused classifier outputs).

  Args:
    config: the experiment config.
    source: a data source with ``category_ids``.
    field: how the dataset was named, e.g. ``data.train=coco:ROOT:SPLIT``.
  """
  want = config.model.num_classes
  have = len(source.category_ids)
  if have > want:
    raise ValueError(
        f"model.num_classes={want} but {field} has {have} categories: "
        f"labels >= {want} would silently train as background. Set "
        f"--config.model.num_classes={have}.")
  if have < want:
    logging.warning("model.num_classes=%d but %s has only %d categories; "
                    "the extra classifier outputs are never trained.",
                    want, field, have)
