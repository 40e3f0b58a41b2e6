"""The batch-size rule: lr x k, durations / k, EMA momentum ** k; loading
a config file with overrides."""

import os

import pytest

from boxseg_jax import config as config_lib
from boxseg_jax import config_helpers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_boxinst_1x_at_batch_4():
  c = config_lib.base_config()  # the 16-image BoxInst R-50 1x recipe
  assert (c.data.batch_size, c.optim.base_lr, c.train.num_steps) == (
      16, 0.01, 90000)
  out = config_helpers.scale_to_batch_size(c, 4)
  assert out is c
  assert c.data.batch_size == 4
  assert c.optim.base_lr == pytest.approx(0.0025)
  assert c.train.num_steps == 360000
  assert c.optim.lr_boundaries == (240000, 320000)
  assert c.optim.warmup_steps == 4000
  assert c.train.eval_every_steps == 40000
  assert c.ckpt.every_steps == 20000
  assert c.loss.pairwise_warmup_iters == 40000
  assert c.teacher.momentum == pytest.approx(0.999 ** 0.25)
  assert c.data.eval_batch_size == 8  # untouched
  # Images seen and lr per image are unchanged.
  assert c.train.num_steps * c.data.batch_size == 90000 * 16
  assert c.optim.base_lr / c.data.batch_size == pytest.approx(0.01 / 16)
  config_lib.validate(c)


def test_round_trip_and_edge_cases():
  c = config_lib.base_config()
  config_helpers.scale_to_batch_size(c, 2)
  config_helpers.scale_to_batch_size(c, 16)
  ref = config_lib.base_config()
  assert c.train.num_steps == ref.train.num_steps
  assert c.optim.lr_boundaries == ref.optim.lr_boundaries
  assert c.optim.base_lr == pytest.approx(ref.optim.base_lr)
  assert c.teacher.momentum == pytest.approx(ref.teacher.momentum)
  c.train.eval_every_steps = 0  # "only at the end" stays 0
  config_helpers.scale_to_batch_size(c, 32)
  assert c.train.eval_every_steps == 0
  assert c.train.num_steps == 45000
  with pytest.raises(ValueError, match="positive"):
    config_helpers.scale_to_batch_size(c, 0)


def test_load_config_file_by_name_path_and_variant():
  c = config_helpers.load_config_file("tiny", **{"train.num_steps": 3,
                                                 "model.num_classes": 2})
  assert c.train.num_steps == 3 and c.model.num_classes == 2
  path = os.path.join(REPO, "configs", "demo.py")
  full = config_helpers.load_config_file(path)
  assert full.pc.enabled
  off = config_helpers.load_config_file(path, "no_pc")
  assert not off.pc.enabled and off.method == full.method
  with pytest.raises(KeyError, match="train.num_stepz"):
    config_helpers.load_config_file("tiny", **{"train.num_stepz": 3})
