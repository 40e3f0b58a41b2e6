"""Trainer: exact resume, kill -9, SIGTERM, non-finite guard, partial init.

All runs use configs/tiny.py (a small CondInst on 64x64 `shapes`).
"""

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from boxseg_jax import config_helpers
from boxseg_jax.data import pipeline
from boxseg_jax.train import checkpoint as ckpt_lib
from boxseg_jax.train import loop

REPO = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
N = 6


def tiny_config(variant=None, **overrides):
  c = config_helpers.load_config_file("tiny", variant)
  c.train.num_steps = N
  c.train.log_every_steps = 1
  c.train.eval_at_end = False
  c.ckpt.every_steps = 2
  c.ckpt.max_to_keep = 10
  return config_helpers.apply_overrides(c, overrides)


def _leaves(state):
  return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(
      (state.params, state.ema_params, state.opt_state, state.batch_stats)))]


def assert_same_state(a, b, atol=1e-6):
  for x, y in zip(_leaves(a), _leaves(b)):
    np.testing.assert_allclose(x, y, atol=atol, rtol=0)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  """N steps in one go: the reference every resumed run must reproduce."""
  workdir = str(tmp_path_factory.mktemp("straight"))
  summary = loop.train_and_evaluate(tiny_config(), workdir)
  return summary, workdir


def _losses(summary):
  return {step: m["loss"] for step, m in summary["history"]}


def test_straight_run_compiles_once_and_logs(straight):
  summary, workdir = straight
  assert summary["compilations"] == 1
  assert summary["final_step"] == N
  assert sorted(_losses(summary)) == list(range(1, N + 1))
  assert all(np.isfinite(v) for v in _losses(summary).values())
  # Without a teacher forward the teacher's BN statistics follow the
  # student's (they moved away from their init values).
  state = summary["state"]
  for a, b in zip(jax.tree.leaves(state.ema_batch_stats),
                  jax.tree.leaves(state.batch_stats)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert any(np.any(np.asarray(x) != 0) for x in jax.tree.leaves(
      state.batch_stats))
  assert os.path.isdir(os.path.join(workdir, "checkpoints", str(N)))
  # TensorBoard event file written by CLU.
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(workdir))


def test_resume_is_exact(straight, tmp_path):
  ref, _ = straight
  workdir = str(tmp_path)
  first = loop.train_and_evaluate(tiny_config(**{"train.num_steps": N // 2}),
                                  workdir)
  assert first["final_step"] == N // 2
  second = loop.train_and_evaluate(tiny_config(), workdir)
  assert second["resumed_from"] == "workdir"
  assert second["start_step"] == N // 2
  ref_losses, got = _losses(ref), _losses(second)
  for step in range(N // 2 + 1, N + 1):
    assert got[step] == pytest.approx(ref_losses[step], abs=1e-6), step
  assert_same_state(ref["state"], second["state"])


def _train_subprocess(workdir, extra=()):
  env = dict(os.environ)
  return subprocess.Popen(
      [sys.executable, "-m", "boxseg_jax.main", "--config=configs/tiny.py",
       f"--workdir={workdir}", f"--config.train.num_steps={N}",
       "--config.train.eval_at_end=False", "--config.ckpt.every_steps=2",
       "--config.ckpt.max_to_keep=10", "--config.train.log_every_steps=1",
       *extra],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
      text=True)


def _wait_for_checkpoint(workdir, proc, timeout=300):
  ckpt = os.path.join(workdir, "checkpoints")
  t0 = time.time()
  while time.time() - t0 < timeout:
    if os.path.isdir(ckpt) and any(d.isdigit() for d in os.listdir(ckpt)):
      return
    if proc.poll() is not None:
      raise AssertionError(f"trainer exited early:\n{proc.stdout.read()}")
    time.sleep(0.05)
  raise AssertionError("no checkpoint appeared")


def test_kill9_then_resume_matches_straight_run(straight, tmp_path):
  ref, _ = straight
  workdir = str(tmp_path)
  proc = _train_subprocess(workdir)
  _wait_for_checkpoint(workdir, proc)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL
  steps = sorted(int(d) for d in os.listdir(os.path.join(workdir,
                                                         "checkpoints"))
                 if d.isdigit())
  assert steps and steps[-1] <= N
  resumed = loop.train_and_evaluate(tiny_config(), workdir)
  assert resumed["resumed_from"] == "workdir"
  assert resumed["final_step"] == N
  assert_same_state(ref["state"], resumed["state"])


def test_sigterm_leaves_complete_checkpoint(tmp_path):
  workdir = str(tmp_path)
  proc = _train_subprocess(workdir, ["--config.train.num_steps=100000"])
  _wait_for_checkpoint(workdir, proc)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, out
  assert "preempted_at" in out
  ckpt = os.path.join(workdir, "checkpoints")
  steps = sorted(int(d) for d in os.listdir(ckpt) if d.isdigit())
  assert not [d for d in os.listdir(ckpt) if "tmp" in d]
  stopped = int(out.split('"preempted_at": ')[1].split(",")[0].split("}")[0])
  assert steps[-1] == stopped
  assert os.path.exists(os.path.join(ckpt, "input", f"{stopped}.p0.json"))
  resumed = loop.train_and_evaluate(
      tiny_config(**{"train.num_steps": stopped + 1}), workdir)
  assert resumed["resumed_from"] == "workdir"
  assert resumed["start_step"] == stopped


def test_nonfinite_updates_skipped_and_run_stops(tmp_path):
  # A learning rate of 1e30 makes the first update blow the weights up, so
  # later forwards are non-finite: those updates must be skipped (the
  # parameters stay finite) and the run must stop after the streak limit.
  config = tiny_config(**{"train.max_nonfinite_streak": 2,
                          "train.num_steps": 12, "optim.base_lr": 1e30,
                          "optim.warmup_steps": 0})
  with pytest.raises(loop.NonFiniteLossError, match="non-finite") as err:
    loop.train_and_evaluate(config, str(tmp_path))
  state = err.value.state
  assert int(state.skip_streak) == 3 and int(state.num_skipped) >= 3
  for leaf in jax.tree.leaves(jax.device_get(state.params)):
    assert np.all(np.isfinite(leaf))


def test_overflowing_update_never_reaches_params_or_checkpoints(tmp_path):
  # Three good steps, then a resume with an infinite learning rate: loss and
  # gradients of step 3 are finite, its update is not.
  loop.train_and_evaluate(tiny_config(**{
      "train.num_steps": 3, "ckpt.every_steps": 1}), str(tmp_path))
  config = tiny_config(**{"train.max_nonfinite_streak": 2,
                          "train.num_steps": 12, "optim.base_lr": 1e39,
                          "ckpt.every_steps": 1})
  with pytest.raises(loop.NonFiniteLossError) as err:
    loop.train_and_evaluate(config, str(tmp_path))
  msg = str(err.value)
  assert "updated parameters" in msg
  assert "after step 3" in msg and "newest checkpoint: step 3" in msg
  state = err.value.state
  for leaf in jax.tree.leaves(jax.device_get((state.params,
                                              state.opt_state))):
    assert np.all(np.isfinite(leaf))
  ckpt = ckpt_lib.Checkpointer(str(tmp_path), every_steps=1, max_to_keep=10)
  try:
    assert list(ckpt.all_steps()) == [1, 2, 3]
    restored, _, _ = ckpt.restore(jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state))
  finally:
    ckpt.close()
  for leaf in jax.tree.leaves(jax.device_get(restored.params)):
    assert np.all(np.isfinite(leaf))
  for x, y in zip(jax.tree.leaves(jax.device_get(restored.params)),
                  jax.tree.leaves(jax.device_get(state.params))):
    np.testing.assert_array_equal(x, y)


def test_sigterm_stops_a_run_whose_input_stalls(tmp_path, monkeypatch):
  release = threading.Event()
  real_make_source = pipeline.make_source

  class Stalled:
    """A source that blocks (a hung network filesystem); SIGTERMs us once."""

    def __init__(self, inner):
      self.inner = inner
      self.signalled = False

    def __len__(self):
      return len(self.inner)

    def __getattr__(self, name):  # category_ids, class_names
      return getattr(self.inner, name)

    def __getitem__(self, i):
      if not self.signalled:
        self.signalled = True
        os.kill(os.getpid(), signal.SIGTERM)
      release.wait(120)
      return self.inner[i]

  monkeypatch.setattr(pipeline, "make_source", lambda *a, **k: Stalled(
      real_make_source(*a, **k)))
  t0 = time.time()
  try:
    summary = loop.train_and_evaluate(tiny_config(), str(tmp_path))
  finally:
    release.set()
  assert summary["preempted_at"] == 0
  assert time.time() - t0 < 100


def test_undecodable_training_data_stops_with_a_clear_error(
    tmp_path, write_lfs_pointer_coco):
  root = str(tmp_path / "data")
  write_lfs_pointer_coco(root, num=8)
  config = tiny_config(**{"data.train": f"coco:{root}:s",
                          "data.val": f"coco:{root}:s"})
  with pytest.raises(pipeline.InputError, match=r"data\.train=coco:.*:s"):
    loop.train_and_evaluate(config, str(tmp_path / "w"))


def test_boxteacher_run_compiles_once_and_evaluates_the_teacher(tmp_path):
  config = tiny_config(**{
      "method": "boxteacher", "train.num_steps": 3,
      "train.monitor_pseudo_labels": True, "eval.use_teacher": True,
      "eval.rescore": True, "train.eval_at_end": True,
      "data.test_short_size": 80, "teacher.canvas": (128, 128)})
  summary = loop.train_and_evaluate(config, str(tmp_path))
  assert summary["compilations"] == 1
  last = summary["last_metrics"]
  for key in ("loss_mask", "loss_mask_affinity", "pseudo_fraction",
              "pseudo_iou", "pseudo_flag_mean", "teacher_detections"):
    assert key in last, key
  assert set(summary["eval"]) == {"bbox", "segm", "segm_boxfill",
                                  "segm_boxfill_grid"}


def test_boxseg_pc_resume_is_exact(tmp_path):
  # BoxSeg with Peer-assisted Copy-paste (admission opened to the random
  # teacher, configs/tiny.py:boxseg_pc): the memory bank, the teacher and
  # the paste draws all resume exactly, and the bank is not empty (so the
  # check is not vacuous).
  def config(steps):
    return tiny_config("boxseg_pc", **{"train.num_steps": steps})

  ref = loop.train_and_evaluate(config(4), str(tmp_path / "straight"))
  workdir = str(tmp_path / "resumed")
  first = loop.train_and_evaluate(config(2), workdir)
  assert first["final_step"] == 2
  second = loop.train_and_evaluate(config(4), workdir)
  assert second["resumed_from"] == "workdir"
  assert second["start_step"] == 2
  assert second["compilations"] == 1
  assert max(m["pc_bank_size"] for _, m in ref["history"]) > 0
  assert sum(m["pc_pasted"] for _, m in ref["history"]) > 0
  ref_losses, got = _losses(ref), _losses(second)
  for step in (3, 4):
    assert got[step] == pytest.approx(ref_losses[step], abs=1e-6), step
  assert_same_state(ref["state"], second["state"])
  for k, v in ref["state"].bank.items():
    np.testing.assert_array_equal(np.asarray(v),
                                  np.asarray(second["state"].bank[k]),
                                  err_msg=k)


def test_partial_init_from_checkpoint(straight, tmp_path):
  ref, ref_dir = straight
  config = tiny_config(**{"train.num_steps": 0, "init": ref_dir,
                          "init_keys": ("backbone",)})
  summary = loop.train_and_evaluate(config, str(tmp_path))
  assert summary["resumed_from"] == "init"
  got = jax.device_get(summary["state"].params)
  want = jax.device_get(ref["state"].params)
  for x, y in zip(jax.tree.leaves(got["backbone"]),
                  jax.tree.leaves(want["backbone"])):
    np.testing.assert_array_equal(x, y)
  # Other modules keep their fresh initialisation.
  assert not all(np.array_equal(x, y) for x, y in zip(
      jax.tree.leaves(got["fpn"]), jax.tree.leaves(want["fpn"])))


def test_bad_init_key_is_named(tmp_path, straight):
  _, ref_dir = straight
  config = tiny_config(**{"train.num_steps": 0, "init": ref_dir,
                          "init_keys": ("bakbone",)})
  with pytest.raises(KeyError, match="bakbone"):
    loop.train_and_evaluate(config, str(tmp_path))


@pytest.mark.parametrize("overrides,match", [
    # A tuple override given twice (ml_collections concatenates it).
    ({"data.canvas": (96, 96, 96, 96)}, r"config\.data\.canvas=\(96, 96, "
     r"96, 96\): expected 2 ints"),
    # shapes has 4 categories.
    ({"model.num_classes": 3}, r"model\.num_classes=3 but data\.train="
     r"shapes has 4 categories"),
    # Mask supervision on a box-only annotation file.
    ({"data.train": "coco:{root}:s", "method": "mask",
      "data.with_masks": True}, r"instances_s\.json: masks are required"),
])
def test_config_and_data_mistakes_stop_before_training(
    tmp_path, write_tiny_coco, overrides, match):
  root = str(tmp_path / "data")
  write_tiny_coco(root, masks=False)
  overrides = {k: v.format(root=root) if isinstance(v, str) else v
               for k, v in overrides.items()}
  with pytest.raises(ValueError, match=match):
    loop.train_and_evaluate(tiny_config(**overrides), str(tmp_path / "w"))


def test_val_categories_beyond_num_classes_are_an_error(tmp_path,
                                                        write_tiny_coco):
  root = str(tmp_path / "data")
  spec = write_tiny_coco(root)
  config = tiny_config(**{"data.val": spec, "model.num_classes": 4,
                          "train.num_steps": 0})
  path = os.path.join(root, "annotations", "instances_s.json")
  with open(path) as f:
    doc = json.load(f)
  doc["categories"].append({"id": 5, "name": "c4"})
  with open(path, "w") as f:
    json.dump(doc, f)
  with pytest.raises(ValueError, match=r"model\.num_classes=4 but data\.val"
                     r"=coco:.* has 5 categories"):
    loop.train_and_evaluate(config, str(tmp_path / "w"))


def test_load_statistics_are_logged_once_at_the_start(tmp_path, caplog,
                                                      write_tiny_coco):
  root = str(tmp_path / "data")
  spec = write_tiny_coco(root)
  path = os.path.join(root, "annotations", "instances_s.json")
  with open(path) as f:
    doc = json.load(f)
  doc["annotations"] += [
      {"id": 10, "image_id": 2, "category_id": 1, "bbox": [1, 1, 9, 9],
       "iscrowd": 1},
      {"id": 11, "image_id": 3, "category_id": 1, "bbox": [1, 1, -2, 9],
       "iscrowd": 0}]
  with open(path, "w") as f:
    json.dump(doc, f)
  caplog.set_level(logging.INFO)
  summary = loop.train_and_evaluate(
      tiny_config(**{"data.train": spec, "train.num_steps": 0}),
      str(tmp_path / "w"))
  report = summary["train_data"]
  assert report["images"] == 4 and report["instances"] == 4
  assert report["crowd"] == 1 and report["bad_boxes"] == 1
  assert report["bad_box_files"] == ["2.png"]
  lines = [r.getMessage() for r in caplog.records
           if r.getMessage().startswith(f"data.train={spec}: ")]
  assert len(lines) == 1 and "1 bad boxes dropped" in lines[0]
  assert "bad boxes in: 2.png" in lines[0]
