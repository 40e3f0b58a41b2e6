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
  c.data.shapes = ml_collections.ConfigDict(dict(
      num_train=2000, num_val=200, seed=0, image_size=(320, 320),
      min_objects=1, max_objects=8, min_size=12.0, max_size=220.0))
  return c


def transform_config(config: ml_collections.ConfigDict, *,
                     masks=None) -> transforms.TransformConfig:
  """The static transform parameters of ``config.data``."""
  d = config.data
  if masks is None and d.with_masks:
    masks = "s4"
  return transforms.TransformConfig(
      canvas=tuple(d.canvas), max_instances=d.max_instances,
      short_sizes=tuple(d.train_short_sizes), max_size=d.train_max_size,
      test_short_size=d.test_short_size, test_max_size=d.test_max_size,
      hflip_prob=d.hflip_prob, photometric=d.photometric, masks=masks)
