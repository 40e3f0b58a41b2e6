"""``config.init`` from a converted checkpoint, proven leaf by leaf.

A synthetic AdelaiDet checkpoint of the tiny network is converted with the
command line tool; a run from scratch and runs initialised from it (0
training steps) are compared leaf by leaf: exactly the subtrees named in
``config.init_keys`` hold the checkpoint's values, everything else is the
scratch initialisation. Fine-tuning on another number of classes
re-initialises the class-dependent leaves only, and logs them.
"""

import logging
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import traverse_util

import fake_torch
from boxseg_jax import config_helpers
from boxseg_jax.convert import condinst as condinst_conv
from boxseg_jax.convert import weights
from boxseg_jax.train import loop

REPO = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))


def _tiny_config():
  c = config_helpers.load_config_file("tiny")
  c.train.num_steps = 0
  c.train.eval_at_end = False
  return c


def _arch(config, num_classes):
  m = config.model
  return dict(depth=50, resnet_num_blocks=tuple(m.resnet_num_blocks),
              resnet_width=m.resnet_width, num_classes=num_classes,
              fpn_channels=m.fpn_channels, head_num_convs=m.head_num_convs,
              mask_branch_channels=m.mask_branch_channels,
              mask_branch_out_channels=m.mask_branch_out_channels,
              mask_branch_num_convs=m.mask_branch_num_convs,
              mask_head_channels=m.mask_head_channels,
              mask_head_num_layers=m.mask_head_num_layers)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  """(npz path, hints) of a synthetic 4-class and a 6-class checkpoint."""
  tmp = tmp_path_factory.mktemp("conv")
  out = {}
  for classes in (4, 6):
    sd = fake_torch.random_arrays(condinst_conv.condinst_key_shapes(
        _arch(_tiny_config(), classes)), seed=classes)
    src = str(tmp / f"boxinst_{classes}.pth")
    fake_torch.save(src, {"model": sd})
    npz = str(tmp / f"boxinst_{classes}.npz")
    if classes == 4:  # through the command line once
      res = subprocess.run(
          [sys.executable, "-m", "boxseg_jax.convert", f"--input={src}",
           "--format=adelaidet", f"--output={npz}"],
          cwd=REPO, capture_output=True, text=True, timeout=300)
      assert res.returncode == 0, res.stderr[-3000:]
      assert "--config.model.num_classes=4" in res.stdout
      assert "--config.init_keys=(backbone,fcos_head,fpn,mask_branch)" in (
          res.stdout)
    else:
      weights.save(weights.convert_file(src, "adelaidet"), npz)
    out[classes] = (npz, weights.read_hints(npz))
  return out


def _config_for(hints, **overrides):
  c = _tiny_config()
  changed = weights.apply_hints(c, hints)
  assert any(line.startswith("model.backbone_norm") for line in changed)
  for k, v in overrides.items():
    node = c
    *path, last = k.split(".")
    for p in path:
      node = node[p]
    node[last] = v
  return c


def _run(config, workdir):
  summary = loop.train_and_evaluate(config, str(workdir))
  state = summary["state"]
  return (summary["resumed_from"],
          traverse_util.flatten_dict(jax.device_get(state.params), sep="/"),
          traverse_util.flatten_dict(jax.device_get(state.ema_params),
                                     sep="/"))


@pytest.fixture(scope="module")
def scratch(converted, tmp_path_factory):
  """Parameters of the same network trained from scratch (0 steps)."""
  how, params, _ = _run(_config_for(converted[4][1]),
                        tmp_path_factory.mktemp("scratch"))
  assert how == "scratch"
  return params


def test_partial_init_leaf_by_leaf(converted, scratch, tmp_path):
  npz, hints = converted[4]
  assert hints["config"]["model.num_classes"] == 4
  stored = dict(np.load(npz))
  keys = ("backbone", "fpn")
  how, init, ema = _run(_config_for(hints, init=npz, init_keys=keys),
                        tmp_path / "init")
  assert how == "init"
  assert set(init) == set(scratch)
  for name, value in init.items():
    np.testing.assert_array_equal(ema[name], value)  # teacher = student
    if name.split("/")[0] in keys:
      np.testing.assert_array_equal(value, stored[name], err_msg=name)
      assert not np.array_equal(value, scratch[name]), name
    else:
      np.testing.assert_array_equal(value, scratch[name], err_msg=name)
  loaded = [n for n in init if n.split("/")[0] in keys]
  assert len(loaded) == len([k for k in stored if k.split("/")[0] in keys])


def test_finetune_other_num_classes_reinitialises_class_leaves(
    converted, scratch, tmp_path, caplog):
  npz6, hints6 = converted[6]
  hints = dict(hints6, config=dict(hints6["config"], **{
      "model.num_classes": 4}))  # the dataset (shapes) has 4 classes
  stored = dict(np.load(npz6))
  all_keys = ("backbone", "fpn", "fcos_head", "mask_branch")
  with caplog.at_level(logging.WARNING):
    how, init, _ = _run(_config_for(hints, init=npz6, init_keys=all_keys),
                        tmp_path / "ft")
  assert how == "init"
  reinit = {"fcos_head/cls_logits/kernel", "fcos_head/cls_logits/bias"}
  for name, value in init.items():
    if name in reinit:
      np.testing.assert_array_equal(value, scratch[name])
      assert stored[name].shape[-1] == 6 and value.shape[-1] == 4
    else:
      np.testing.assert_array_equal(value, stored[name], err_msg=name)
  msg = " ".join(r.getMessage() for r in caplog.records)
  assert ("2 class-dependent parameter(s) have another shape and keep their "
          "fresh initialisation") in msg
  assert "fcos_head/cls_logits/kernel (3, 3, 32, 6) -> (3, 3, 32, 4)" in msg
  assert "fcos_head/cls_logits/bias (6,) -> (4,)" in msg
  # Any other mismatch still fails by name.
  bad = dict(stored)
  bad["fpn/fpn_output3/bias"] = np.zeros((3,), np.float32)
  path = str(tmp_path / "bad.npz")
  np.savez(path, **bad)
  with pytest.raises(ValueError, match="fpn/fpn_output3/bias has shape"):
    loop.train_and_evaluate(_config_for(hints, init=path,
                                        init_keys=all_keys),
                            str(tmp_path / "bad"))
