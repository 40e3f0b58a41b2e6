r"""Demo: box-supervised training on the built-in `shapes` data, 2 CPU cores.

The README's main job. Until the trainer lands (issue: training system) the
main job renders augmented batches of this config with
`python -m boxseg_jax.tools.visualize_data --config=configs/demo.py`.
"""

from boxseg_jax import config as config_lib


def get_config(arg=None):
  del arg
  c = config_lib.base_config()
  c.data.train = "shapes"
  c.data.val = "shapes:val"
  c.data.canvas = (256, 256)
  c.data.max_instances = 16
  c.data.train_short_sizes = (192, 224, 256)
  c.data.train_max_size = 256
  c.data.test_short_size = 256
  c.data.test_max_size = 256
  c.data.photometric = "strongv2"
  c.data.batch_size = 8
  c.data.eval_batch_size = 8
  c.data.shapes.num_train = 2000
  c.data.shapes.num_val = 100
  c.data.shapes.image_size = (256, 256)
  c.data.shapes.min_size = 10.0
  c.data.shapes.max_size = 180.0
  return c
