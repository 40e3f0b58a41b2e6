"""``python -m boxseg_jax.evaluate``: the AP a training run wrote, exactly.

Uses the tiny trained workdir of ``trained_tiny.py`` (40 steps, evaluated
by the trainer at steps 20 and 40).
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import traverse_util

import trained_tiny
from boxseg_jax import evaluate
from boxseg_jax.convert import common
from boxseg_jax.train import inference_ckpt

pytestmark = pytest.mark.slow  # trains the shared tiny workdir once


def _read(path):
  with open(path) as f:
    return json.load(f)


def test_reproduces_training_ap_exactly(tmp_path):
  workdir = trained_tiny.workdir()
  for step in (20, 40):
    want = _read(os.path.join(workdir, "eval", f"step_{step}.json"))
    model = inference_ckpt.load_workdir(
        workdir, step=None if step == 40 else step)
    assert model.step == step and not model.teacher
    out = str(tmp_path / f"s{step}")
    evaluate.evaluate(model, out)
    got = _read(os.path.join(out, "eval", f"step_{step}.json"))
    assert got == want  # every metric and the prediction count, exactly
  # Not vacuous: detections score, and masks went through the paste-back
  # (40 steps from scratch may not yet draw masks that match: segm can be 0;
  # the grid box-fill pastes through the same path and must score).
  assert want["bbox"]["AP"] > 0 and "segm" in want
  assert want["segm_boxfill_grid"]["AP50"] > 0


def test_command_line_and_converted_weights(tmp_path):
  workdir = trained_tiny.workdir()
  want = _read(os.path.join(workdir, "eval", "step_40.json"))
  # The CLI from the workdir alone (the trainer wrote config.json).
  out = str(tmp_path / "cli")
  res = subprocess.run(
      [sys.executable, "-m", "boxseg_jax.evaluate", f"--workdir={workdir}",
       f"--output={out}"], cwd=trained_tiny.REPO, capture_output=True,
      text=True, timeout=600)
  assert res.returncode == 0, res.stderr[-3000:]
  assert _read(os.path.join(out, "eval", "step_40.json")) == want
  summary = json.loads(res.stdout.strip().splitlines()[-1])
  assert summary["metrics"]["bbox"]["AP"] == want["bbox"]["AP"]
  # The same weights as a converted .npz (the format convert writes, with
  # batch_stats/ entries) under --config evaluate to the same AP.
  model = inference_ckpt.load_workdir(workdir)
  flat = {"params/" + k: np.asarray(v) for k, v in traverse_util.flatten_dict(
      jax.device_get(model.params), sep="/").items()}
  flat.update({"batch_stats/" + k: np.asarray(v) for k, v in
               traverse_util.flatten_dict(jax.device_get(model.batch_stats),
                                          sep="/").items()})
  npz = str(tmp_path / "weights.npz")
  np.savez(npz, **{k[len("params/"):] if k.startswith("params/") else k: v
                   for k, v in flat.items()})
  from_npz = inference_ckpt.load(weights=npz, config=trained_tiny.tiny_config(),
                                 step=40)
  out = str(tmp_path / "npz")
  evaluate.evaluate(from_npz, out)
  assert _read(os.path.join(out, "eval", "step_40.json")) == want
  # A backbone-only file cannot be evaluated: the missing keys are named.
  np.savez(npz, **{k: v for k, v in np.load(npz).items()
                   if k.startswith("backbone/")})
  with pytest.raises(common.ConversionError,
                     match="missing fcos_head/cls_logits/bias"):
    inference_ckpt.load(weights=npz, config=trained_tiny.tiny_config())


def test_workdir_without_config_needs_one(tmp_path):
  os.makedirs(tmp_path / "checkpoints")
  with pytest.raises(FileNotFoundError, match="pass the run's --config"):
    inference_ckpt.load_workdir(str(tmp_path))
  with pytest.raises(ValueError, match="exactly one of"):
    inference_ckpt.load(workdir="a", weights="b.npz")
  config = trained_tiny.tiny_config()
  inference_ckpt.apply_overrides(config, ["eval.num_images=3",
                                          "data.canvas=(64, 64)",
                                          "data.val=shapes:train"])
  assert config.eval.num_images == 3 and config.data.canvas == (64, 64)
  assert config.data.val == "shapes:train"
  with pytest.raises(KeyError, match="eval.nope"):
    inference_ckpt.apply_overrides(config, ["eval.nope=1"])
  text = inference_ckpt.config_to_json(config)
  assert inference_ckpt.config_from_json(text) == config
