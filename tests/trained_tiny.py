"""A tiny trained workdir shared by the evaluate / predict / export tests.

Trained once per test process (the first test that asks), with
``configs/tiny.py`` for 40 AdamW steps, evaluated at steps 20 and 40 with
``eval.score_thresh = 0`` on 8 val images, so the AP it writes is not
trivially zero.
"""

import atexit
import os
import shutil
import tempfile

from boxseg_jax import config_helpers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 40
_CACHE = {}


def tiny_config():
  c = config_helpers.load_config_file("tiny")
  c.train.num_steps = STEPS
  c.train.eval_every_steps = STEPS // 2
  c.train.log_every_steps = STEPS // 2
  c.ckpt.every_steps = STEPS // 2
  c.ckpt.max_to_keep = 5
  c.ckpt.async_save = False
  c.optim.name = "adamw"
  c.optim.base_lr = 3e-3
  c.eval.score_thresh = 0.0
  c.eval.num_panels = 0
  c.data.shapes.num_val = 8
  return c


def workdir():
  """Path of the trained workdir (``checkpoints/{20,40}``, ``eval/``)."""
  if "workdir" not in _CACHE:
    from boxseg_jax.train import loop  # pylint: disable=g-import-not-at-top
    path = tempfile.mkdtemp(prefix="boxseg_tiny_trained_")
    atexit.register(shutil.rmtree, path, True)
    summary = loop.train_and_evaluate(tiny_config(), path)
    assert summary["final_step"] == STEPS
    _CACHE["workdir"] = path
  return _CACHE["workdir"]
