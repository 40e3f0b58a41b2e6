"""Config helpers that derive several values from one decision.

``scale_to_batch_size(config, batch_size)``: the published recipes use 16
images per step (8 GPUs x 2). On a smaller machine, keep the number of
*images* seen and the learning rate per image (the linear scaling rule of
Goyal et al. 2017, which detectron2's ``DefaultTrainer.auto_scale_workers``
applies), with ``k = batch_size / config.data.batch_size``:

* ``data.batch_size``   <- ``batch_size``
* ``optim.base_lr``     <- ``base_lr * k``
* every duration in steps is divided by ``k`` (rounded):
  ``train.num_steps``, ``optim.lr_boundaries``, ``optim.warmup_steps``,
  ``train.eval_every_steps``, ``ckpt.every_steps``,
  ``loss.pairwise_warmup_iters``;
* ``teacher.momentum``  <- ``momentum ** k``, so the EMA teacher averages
  over the same number of images (its time constant ``1 / (1 - m)`` is in
  steps);
* ``data.eval_batch_size`` is left alone (evaluation does not train).

E.g. BoxInst R-50 1x at batch 4: lr 0.0025, 360k steps, decays at 240k and
320k, warm-up 4000 steps, EMA momentum 0.99975. The rule is for SGD; for
AdamW it is a first guess (square-root scaling of the learning rate is
the other common choice). Small batches also change BatchNorm statistics of
the mask branch (computed over the global batch here).

``load_config_file(path, arg=None, **overrides)``: a config file's
``get_config(arg)`` (what ``--config=PATH:ARG`` gives) with dotted-key
overrides, for notebooks, benchmarks and tests; ``apply_overrides(config,
overrides)`` the same overrides on a config already loaded.
"""

import importlib.util
import os
from typing import Any, Dict, Optional

import ml_collections

STEP_FIELDS = (("train", "num_steps"), ("optim", "warmup_steps"),
               ("train", "eval_every_steps"), ("ckpt", "every_steps"),
               ("loss", "pairwise_warmup_iters"))


def scale_to_batch_size(config: ml_collections.ConfigDict,
                        batch_size: int) -> ml_collections.ConfigDict:
  """Rescales learning rate and schedule to ``batch_size`` (in place).

  Args:
    config: a config whose ``data.batch_size`` is the recipe's (16 for
      the published ones).
    batch_size: the global batch size to train with.

  Returns:
    ``config`` (modified in place, for chaining in ``get_config``).
  """
  if batch_size <= 0:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  k = batch_size / config.data.batch_size

  def steps(v: int) -> int:
    return max(int(round(v / k)), 1) if v > 0 else v

  config.data.batch_size = int(batch_size)
  config.optim.base_lr = config.optim.base_lr * k
  for group, field in STEP_FIELDS:
    config[group][field] = steps(config[group][field])
  config.optim.lr_boundaries = tuple(steps(b)
                                     for b in config.optim.lr_boundaries)
  config.teacher.momentum = float(config.teacher.momentum ** k)
  return config


def load_config_file(path: str, arg: Optional[str] = None,
                     **overrides: Any) -> ml_collections.ConfigDict:
  """``get_config(arg)`` of the config file ``path`` (a ``.py`` file, or a
  name in the repository's ``configs/``), then ``overrides`` by dotted key
  (``**{"train.num_steps": 3}``); an unknown key raises ``KeyError``."""
  if not path.endswith(".py"):
    path = os.path.join(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))), "configs", path + ".py")
  spec = importlib.util.spec_from_file_location(
      os.path.splitext(os.path.basename(path))[0], path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  config = mod.get_config() if arg is None else mod.get_config(arg)
  return apply_overrides(config, overrides)


def apply_overrides(config: ml_collections.ConfigDict,
                    overrides: Dict[str, Any]) -> ml_collections.ConfigDict:
  """Sets ``{"group.field": value}`` in ``config`` (in place; returned);
  an unknown key raises ``KeyError``."""
  for key, value in overrides.items():
    node = config
    *parents, last = key.split(".")
    for name in parents:
      node = node[name]
    if last not in node:
      raise KeyError(f"config has no field {key!r}")
    node[last] = value
  return config
