"""Checkpoints: a broken newest step falls back to the newest intact one;
another model shape is named; nothing restorable names the directory.

Real tiny checkpoints (configs/tiny.py state, no training step compiled),
corrupted on disk the way a full disk, a killed copy or a stray ``rm`` does.
"""

import glob
import logging
import os
import shutil

import jax
import jax.numpy as jnp
import pytest

from boxseg_jax import config_helpers
from boxseg_jax.train import checkpoint as ckpt_lib
from boxseg_jax.train import loop
from boxseg_jax.train import models
from boxseg_jax.train import optim
from boxseg_jax.train import step as step_lib


def _config(**model):
  c = config_helpers.load_config_file("tiny")
  for k, v in model.items():
    c.model[k] = v
  return c


def _parts(config):
  mesh = step_lib.make_mesh(-1)
  model = models.build_model(config)
  abstract = jax.eval_shape(lambda: model.init(
      jax.random.PRNGKey(0), jnp.zeros((1, 96, 96, 3)), train=False))
  tx, _ = optim.make_optimizer(
      config.optim, models.trainable_mask(config, abstract["params"]))
  return model, tx, mesh


def _checkpointer(workdir):
  return ckpt_lib.Checkpointer(workdir, every_steps=1, max_to_keep=10,
                               async_save=False)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """A workdir with steps 2 and 4 (step k: ``step`` = k, input k)."""
  workdir = str(tmp_path_factory.mktemp("saved"))
  config = _config()
  model, tx, mesh = _parts(config)
  state = loop.init_state(config, model, tx, mesh)
  ckpt = _checkpointer(workdir)
  for k in (2, 4):
    ckpt.save(k, state.replace(step=jnp.asarray(k, jnp.int32)),
              {"next_index": k}, force=True)
  ckpt.close()
  return workdir


def _copy(saved, tmp_path):
  workdir = str(tmp_path / "w")
  shutil.copytree(saved, workdir)
  return workdir


def _restore(workdir, config=None):
  config = config or _config()
  model, tx, mesh = _parts(config)
  ckpt = _checkpointer(workdir)
  try:
    state, input_state, how = loop.restore_or_init(config, model, tx, mesh,
                                                   ckpt)
    return int(state.step), input_state, how, ckpt.all_steps()
  finally:
    ckpt.close()


def _truncate_arrays(workdir, step):
  files = glob.glob(os.path.join(workdir, "checkpoints", str(step), "state",
                                 "**", "d", "*"), recursive=True)
  assert files
  for f in files:
    with open(f, "r+b") as fh:
      fh.truncate(7)


def _delete_metadata(workdir, step):
  os.remove(os.path.join(workdir, "checkpoints", str(step), "state",
                         "_METADATA"))


def _delete_state(workdir, step):
  shutil.rmtree(os.path.join(workdir, "checkpoints", str(step), "state"))


def _delete_input_position(workdir, step):
  os.remove(os.path.join(workdir, "checkpoints", "input", f"{step}.p0.json"))


@pytest.mark.parametrize("corrupt", [_truncate_arrays, _delete_metadata,
                                     _delete_state, _delete_input_position])
def test_broken_newest_step_falls_back_to_the_newest_intact(
    saved, tmp_path, caplog, corrupt):
  workdir = _copy(saved, tmp_path)
  corrupt(workdir, 4)
  with caplog.at_level(logging.WARNING):
    step, input_state, how, steps = _restore(workdir)
  assert (step, input_state, how) == (2, {"next_index": 2}, "workdir")
  assert "Checkpoint step 4" in caplog.text
  assert "Resumed from step 2, the newest intact checkpoint; skipped step " \
         "4 (" in caplog.text
  # Set aside, so that Orbax saves steps 3 and 4 again.
  assert list(steps) == [2]
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "4.corrupt"))


def test_saving_resumes_after_the_fallback(saved, tmp_path):
  workdir = _copy(saved, tmp_path)
  _truncate_arrays(workdir, 4)
  config = _config()
  model, tx, mesh = _parts(config)
  ckpt = _checkpointer(workdir)
  try:
    state, _, _ = loop.restore_or_init(config, model, tx, mesh, ckpt)
    assert ckpt.save(3, state, {"next_index": 3})
    ckpt.wait()
    assert list(ckpt.all_steps()) == [2, 3]
  finally:
    ckpt.close()


def test_nothing_restores_names_the_directory_and_each_step(saved,
                                                            tmp_path):
  workdir = _copy(saved, tmp_path)
  _truncate_arrays(workdir, 4)
  _delete_state(workdir, 2)
  with pytest.raises(ckpt_lib.CheckpointError) as err:
    _restore(workdir)
  msg = str(err.value)
  assert msg.startswith(os.path.join(workdir, "checkpoints") +
                        ": no checkpoint step restores")
  assert "step 4: " in msg and "step 2: " in msg and "--workdir" in msg
  # Nothing was moved: the user decides.
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == [
      "2", "4", "input"]


def test_another_model_shape_names_the_parameter(saved, tmp_path):
  workdir = _copy(saved, tmp_path)
  with pytest.raises(ckpt_lib.CheckpointError) as err:
    _restore(workdir, _config(fpn_channels=64))
  msg = str(err.value)
  assert ("checkpoints/4/state: written by another model: params/fcos_head/"
          "bbox_pred/kernel has shape (3, 3, 32, 4) in the checkpoint, the "
          "model of this config has (3, 3, 64, 4)") in msg
  assert "new --workdir" in msg and "--config.init=" in msg
  # Another structure (a deeper head) is named too.
  with pytest.raises(ckpt_lib.CheckpointError, match=r"params/.* is not in "
                     "the checkpoint"):
    _restore(workdir, _config(head_num_convs=2))


def test_intact_checkpoint_restores_the_newest(saved, tmp_path):
  step, input_state, _, _ = _restore(_copy(saved, tmp_path))
  assert (step, input_state) == (4, {"next_index": 4})


def test_pc_bank_is_checkpointed_sharded_and_restored_exactly(tmp_path):
  # A BoxSeg state with Peer-assisted Copy-paste: the memory bank (a
  # leading per-device axis sharded on `data`) is saved and restored with
  # the rest of the state, contents and sharding.
  config = _config()
  config.method = "boxseg"
  config.pc.enabled = True
  config.pc.capacity = 3
  config.pc.crop = (32, 32)
  model, tx, mesh = _parts(config)
  state = loop.init_state(config, model, tx, mesh)
  bank = state.bank
  assert bank["valid"].shape == (mesh.devices.size, 3)
  assert bank["image"].sharding.spec == jax.sharding.PartitionSpec("data")
  key = jax.random.PRNGKey(5)
  filled = dict(bank)
  filled["valid"] = bank["valid"].at[:, 1].set(True)
  filled["image"] = jax.random.randint(key, bank["image"].shape, 0, 255,
                                       jnp.int32).astype(jnp.uint8)
  filled["scores"] = jax.random.uniform(key, bank["scores"].shape)
  filled = jax.device_put(filled, step_lib.shardings(mesh)[1])
  ckpt = _checkpointer(str(tmp_path))
  try:
    ckpt.save(1, state.replace(bank=filled), {"next_index": 1}, force=True)
  finally:
    ckpt.close()
  ckpt = _checkpointer(str(tmp_path))
  try:
    restored, _, how = loop.restore_or_init(config, model, tx, mesh, ckpt)
  finally:
    ckpt.close()
  assert how == "workdir"
  for k, v in filled.items():
    assert restored.bank[k].sharding.spec == jax.sharding.PartitionSpec(
        "data"), k
    assert bool(jnp.array_equal(restored.bank[k], v)), k
