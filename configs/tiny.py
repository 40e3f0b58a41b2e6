r"""Tiny config for tests: `shapes` at 64x64 on a 64x64 canvas.

Command (CPU, seconds):
  python -m boxseg_jax.tools.visualize_data --config=configs/tiny.py \
      --output=/tmp/vis
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
  c.data.batch_size = 2
  c.data.eval_batch_size = 2
  c.data.shapes.num_train = 16
  c.data.shapes.num_val = 4
  c.data.shapes.image_size = (64, 64)
  c.data.shapes.min_size = 8.0
  c.data.shapes.max_size = 48.0
  c.data.shapes.max_objects = 4
  return c
