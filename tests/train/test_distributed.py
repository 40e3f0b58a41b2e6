"""Data parallelism: 4 CPU devices == 1 device; two processes train together.
"""

import json
import os
import socket
import subprocess
import sys

import pytest

import forced_devices

REPO = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))

SHARDED_SCRIPT = r"""
import importlib.util, json, sys
import jax, jax.numpy as jnp, numpy as np
from boxseg_jax import config as config_lib
from boxseg_jax.data import pipeline
from boxseg_jax.train import loop, models, optim, step as step_lib

spec = importlib.util.spec_from_file_location("tiny", "configs/tiny.py")
mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
c = mod.get_config()
assert len(jax.devices()) == 4, jax.devices()
src = pipeline.make_source(c.data.train, shapes_cfg=c.data.shapes)
batch = next(pipeline.TrainInput(src, config_lib.transform_config(c),
                                 batch_size=c.data.batch_size, seed=0))
model = models.build_model(c)
out = {}
for n in (1, 4):
  mesh = step_lib.make_mesh(n)
  abstract = jax.eval_shape(lambda: model.init(
      jax.random.PRNGKey(0), jnp.zeros((1, 96, 96, 3)), train=False))
  tx, sched = optim.make_optimizer(
      c.optim, models.trainable_mask(c, abstract["params"]))
  state = loop.init_state(c, model, tx, mesh)
  step = step_lib.jit_train_step(
      step_lib.make_train_step(model, tx, sched, c), mesh)
  _, sharding = step_lib.shardings(mesh)
  gb = loop.global_batch(batch, sharding)
  assert len(gb["image"].sharding.device_set) == n
  state, metrics = step(state, gb)
  state, metrics2 = step(state, gb)
  leaves = [np.asarray(x) for x in jax.tree.leaves(
      jax.device_get(state.params))]
  out[n] = {"loss": float(metrics["loss"]), "loss2": float(metrics2["loss"]),
            "num_pos": float(metrics["num_pos"]),
            "params": float(sum(np.abs(x).sum() for x in leaves))}
print("RESULT " + json.dumps(out))
"""


def test_four_devices_equal_one_device():
  res = forced_devices.run(SHARDED_SCRIPT)
  one, four = res["1"], res["4"]
  assert one["num_pos"] == four["num_pos"] > 0
  assert four["loss"] == pytest.approx(one["loss"], rel=1e-5)
  assert four["loss2"] == pytest.approx(one["loss2"], rel=1e-5)
  assert four["params"] == pytest.approx(one["params"], rel=1e-5)


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_processes_train_together_on_both_canvases(tmp_path,
                                                      write_oriented_coco):
  """Two processes, orientation canvases: every step both use the same
  canvas (one compilation per canvas each), agree on the loss, and write
  their own input position; process 0 evaluates."""
  # 4 landscape + 4 portrait images: 2 of each group per process.
  data = write_oriented_coco(str(tmp_path / "data"),
                             [(48, 64), (64, 48)] * 4)
  port = _free_port()
  env = forced_devices.env_with_devices(1)
  procs = []
  for i in range(2):
    procs.append(subprocess.Popen(
        [sys.executable, "-m", "boxseg_jax.main", "--distributed",
         f"--coordinator_address=localhost:{port}", "--num_processes=2",
         f"--process_id={i}", "--config=configs/tiny.py",
         f"--workdir={tmp_path / 'run'}", f"--config.data.train={data}",
         f"--config.data.val={data}",
         "--config.data.canvases=((64,96),(96,64))",
         "--config.data.train_short_sizes=(48,64)",
         # Seed 0 draws both canvases in steps 0-1
         # (test_orientation_canvases checks the schedule).
         "--config.seed=0", "--config.train.num_steps=2",
         "--config.train.log_every_steps=1", "--config.ckpt.every_steps=1",
         "--config.train.eval_at_end=True"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True))
  outs = []
  for p in procs:
    out, _ = p.communicate(timeout=900)
    assert p.returncode == 0, out[-3000:]
    outs.append(out)
  summaries = []
  for i, out in enumerate(outs):
    line = [l for l in out.splitlines()
            if l.startswith(f"summary[process {i}]: ")][0]
    summaries.append(json.loads(line.split(": ", 1)[1]))
    assert "process %d of 2" % i in out
  losses = [s["last_metrics"]["loss"] for s in summaries]
  assert losses[0] == pytest.approx(losses[1], rel=1e-6)
  assert summaries[0]["final_step"] == summaries[1]["final_step"] == 2
  for s in summaries:
    assert s["canvases_seen"] == [[64, 96], [96, 64]]
    assert s["compilations"] == 2
  # Both processes wrote their input position; process 0 the evaluation.
  ckpt = tmp_path / "run" / "checkpoints"
  assert (ckpt / "input" / "2.p0.json").exists()
  assert (ckpt / "input" / "2.p1.json").exists()
  with open(ckpt / "input" / "2.p1.json") as f:
    position = json.load(f)
  assert position["step"] == 2 and set(position["groups"]) == {"0", "1"}
  assert (tmp_path / "run" / "eval" / "step_2.json").exists()
