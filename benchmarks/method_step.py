r"""Benchmark: the whole train step of each method, against BoxInst's.

Times the jitted, donated `train_step` the trainer runs (teacher EMA,
teacher forward + detections or pre-NMS candidates + pseudo labels for
BoxTeacher / BoxSeg, student forward/backward, losses, optax update) on
real batches from the input pipeline, for `--methods` (default boxinst,
boxteacher and boxseg), and prints each method's median step time over
BoxInst's, measured in the same run. Two setups:

* `demo`: each method's demo config (shapes, 128x128, batch 8):
  configs/demo_boxinst.py, demo_boxteacher.py and demo.py (BoxSeg);
* `coco_r50`: ResNet-50-FPN at the COCO canvas 1344x1344 with the teacher's
  test-scale view on its own 1344x1344 canvas, photos from coco-mini
  (`--coco_root`), batch `--batch` (2 on a CPU): configs/
  coco_boxteacher_r50_1x.py (BoxInst: the same without colour
  augmentation) and coco_boxseg_r50_1x.py.

A randomly initialised teacher finds no detection above the 0.05 test
threshold, which would make its NMS and assignment free; `--teacher_score`
(default 0) opens the threshold so the teacher keeps a full 100 detections
per image, as a trained one does (and QAM every pre-NMS candidate; its
selected `[N, K_max]` candidates cost the same whatever their scores).

Usage:
  python benchmarks/method_step.py --setup=demo
  python benchmarks/method_step.py --setup=coco_r50 --batch=2 --steps=2
Writes JSON to benchmarks/results/method_step_<setup>.json.
"""

import argparse
import importlib.util
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp

from boxseg_jax import config as config_lib
from boxseg_jax.data import pipeline
from boxseg_jax.train import loop
from boxseg_jax.train import models
from boxseg_jax.train import optim
from boxseg_jax.train import step as step_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_config(name):
  spec = importlib.util.spec_from_file_location(
      name, os.path.join(REPO, "configs", name + ".py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config()


DEMO_CONFIGS = {"boxinst": "demo_boxinst", "boxteacher": "demo_boxteacher",
                "boxseg": "demo"}
COCO_CONFIGS = {"boxseg": "coco_boxseg_r50_1x"}


def make_config(setup, spec, args):
  """`spec` is a method name or `boxseg:VARIANT` (config.BOXSEG_VARIANTS)."""
  method, _, variant = spec.partition(":")
  if setup == "demo":
    c = _load_config(DEMO_CONFIGS.get(method, "demo_boxinst"))
    c.train.monitor_pseudo_labels = False
  else:
    c = _load_config(COCO_CONFIGS.get(method, "coco_boxteacher_r50_1x"))
    c.data.train = f"coco:{args.coco_root}:train2017"
    c.data.val = f"coco:{args.coco_root}:val2017"
    c.data.batch_size = args.batch
    c.data.num_threads = 2
    # The recipes now train on orientation canvases; this benchmark keeps
    # its measured baseline, the single 1344x1344 canvas.
    c.data.canvases = ()
    c.teacher.canvases = ()
    if method == "boxinst":
      c.data.photometric = "none"
  c.method = method
  if variant:
    config_lib.use_boxseg_variant(c, variant)
  c.eval.score_thresh = args.teacher_score
  return c


def bench(setup, method, args):
  c = make_config(setup, method, args)
  mesh = step_lib.make_mesh(-1)
  model = models.build_model(c)
  abstract = jax.eval_shape(lambda: model.init(
      jax.random.PRNGKey(0), jnp.zeros((1,) + tuple(c.data.canvas) + (3,)),
      train=False))
  tx, sched = optim.make_optimizer(
      c.optim, models.trainable_mask(c, abstract["params"]))
  state = loop.init_state(c, model, tx, mesh)
  source = pipeline.make_source(c.data.train, shapes_cfg=c.data.shapes)
  tcfg = config_lib.transform_config(
      c, teacher_view=step_lib.uses_teacher(c))
  it = pipeline.TrainInput(source, tcfg, batch_size=c.data.batch_size,
                           seed=0, num_threads=c.data.num_threads)
  _, sharding = step_lib.shardings(mesh)
  batches = [loop.global_batch(next(it), sharding)
             for _ in range(args.warmup + args.steps)]
  fn = step_lib.jit_train_step(
      step_lib.make_train_step(model, tx, sched, c), mesh)
  t0 = time.perf_counter()
  compiled = fn.lower(state, batches[0]).compile()
  compile_s = time.perf_counter() - t0
  times = []
  for i, b in enumerate(batches):
    t0 = time.perf_counter()
    state, metrics = compiled(state, b)
    jax.block_until_ready(metrics)
    if i >= args.warmup:
      times.append(time.perf_counter() - t0)
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return {"method": method, "pc": bool(c.pc.enabled),
          "compile_s": compile_s,
          "step_s": statistics.median(times), "times": times,
          "batch": c.data.batch_size, "canvas": list(c.data.canvas),
          "flops": float((cost or {}).get("flops", float("nan"))),
          "teacher_detections": float(metrics.get("teacher_detections",
                                                  float("nan")))}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--setup", default="demo", choices=("demo",
                                                          "coco_r50"))
  parser.add_argument("--methods", default="boxinst,boxteacher,boxseg",
                      help="comma list; boxseg:VARIANT picks a row of "
                      "config.BOXSEG_VARIANTS, e.g. boxseg:no_pc")
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--warmup", type=int, default=1)
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--teacher_score", type=float, default=0.0)
  parser.add_argument("--coco_root", default=os.path.join(
      REPO, "..", "shared", "data", "coco-mini"))
  parser.add_argument("--output", default="")
  args = parser.parse_args()
  results = [bench(args.setup, m, args) for m in args.methods.split(",")]
  base = next((r for r in results if r["method"] == "boxinst"), results[0])
  print(f"setup {args.setup} on {jax.devices()[0].device_kind} "
        f"({jax.device_count()} device(s)), batch {base['batch']}, canvas "
        f"{base['canvas']}")
  for r in results:
    r["ratio_vs_boxinst"] = r["step_s"] / base["step_s"]
    print(f"  {r['method']:<18} step {r['step_s']:.3f} s (median of "
          f"{len(r['times'])}), compile {r['compile_s']:.0f} s, "
          f"{r['flops'] / 1e12:.3f} TFLOP/step, ratio "
          f"{r['ratio_vs_boxinst']:.3f}, teacher dets/img "
          f"{r['teacher_detections']:.0f}")
  out = args.output or os.path.join(REPO, "benchmarks", "results",
                                    f"method_step_{args.setup}.json")
  os.makedirs(os.path.dirname(out), exist_ok=True)
  with open(out, "w") as f:
    json.dump({"setup": args.setup, "device": jax.devices()[0].device_kind,
               "num_devices": jax.device_count(),
               "host": platform.node(), "results": results}, f, indent=2)
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
