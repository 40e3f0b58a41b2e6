r"""Benchmark: train-step throughput at R-50 on the COCO canvases, per device.

For each method of `--methods` (the COCO recipes configs/coco_boxinst_r50_1x
and coco_boxseg_r50_1x, photos from coco-mini), the jitted, donated
`train_step` the trainer runs is compiled and timed on real batches from
the input pipeline on

* the *square* baseline: every image padded to one 1344x1344 canvas
  (`data.canvases = ()`), measured in the same run, and
* the recipe's *orientation canvases* `((800, 1344), (1344, 800))`:
  landscape batches on the first, portrait ones on the second.

Per image, the orientation cost is the mean of the two canvases' step costs
weighted by the share of landscape / portrait photos in the data read
(`pipeline.orientation_groups`, the trainer's own grouping), divided by the
per-device batch; the square cost is its step cost over the batch. The
JSON's `flops_per_image_ratio` and `time_per_image_ratio` are orientation /
square of BoxInst (the issue's goal: <= 0.65 on COCO photos); every
method's own ratios are under `methods`.

Also measured, per compiled step: model FLOPs per image (XLA's cost
analysis of the whole step: forward, backward, update, teacher), img/s per
device, MFU against the device's peak dense FLOP/s where the device kind
is in `PEAK_FLOPS`, and peak memory from the compiled step's memory
analysis (arguments + outputs + temporaries - donated aliases).

`--split`: the step split into separately jitted, cumulative pieces on the
first landscape batch (BoxInst): backbone+FPN forward/backward, the whole
network forward/backward (every head output, for reference), the FCOS
targets, the losses without mask terms (FCOS heads and losses, controller
gather), the losses with BoxInst's terms (mask branch, dynamic head and
mask terms = the difference), the train step (optimizer update and finite
guard = the difference); `derive_parts` turns the chain into parts; and
BoxSeg's `student_batch_fn` (teacher EMA + teacher forward + QAM pseudo labels +
PC paste) when BoxSeg is measured.

`--bf16_check`: one step's losses with `model.dtype=bfloat16` against f32,
same state and batch (the relative differences; on a CPU bf16 is not
faster, so its time there says nothing about accelerators).

A randomly initialised teacher finds no detection above the test
threshold, so `--teacher_score` (default 0) opens it, as
benchmarks/method_step.py does: the teacher keeps a full set of
detections/candidates, as a trained one does.

Usage:
  python benchmarks/train_throughput.py                  # CPU: batch 1
  python benchmarks/train_throughput.py --batch=8 --dtype=bfloat16 \
      --steps=20 --output=/tmp/tt_gpu.json                # an accelerator
Writes JSON (default benchmarks/results/train_throughput_<platform>.json).

Peak dense FLOP/s (vendor data sheets): NVIDIA H100 SXM 989 TFLOP/s bf16,
67 f32 (non-tensor); H200 the same; A100 312 bf16, 19.5 f32 (NVIDIA H100 /
H200 / A100 data sheets); TPU v5e 197 bf16, v5p 459 bf16, v4 275 bf16
(cloud.google.com/tpu/docs/v5e, /v5p, /v4).
"""

import argparse
import ast
import json
import os
import platform
import statistics
import time
from typing import Any, Dict, List

import jax
import jax.numpy as jnp
import numpy as np

from boxseg_jax import config as config_lib
from boxseg_jax import config_helpers
from boxseg_jax.data import pipeline
from boxseg_jax.losses import condinst as condinst_losses
from boxseg_jax.train import loop
from boxseg_jax.train import step as step_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONFIGS = {"boxinst": "coco_boxinst_r50_1x", "boxseg": "coco_boxseg_r50_1x"}

# Peak dense FLOP/s per device kind (see the module docstring), by dtype.
PEAK_FLOPS = {
    "NVIDIA H100 80GB HBM3": {"bfloat16": 989e12, "float32": 67e12},
    "NVIDIA H200": {"bfloat16": 989e12, "float32": 67e12},
    "NVIDIA A100-SXM4-80GB": {"bfloat16": 312e12, "float32": 19.5e12},
    "NVIDIA A100-SXM4-40GB": {"bfloat16": 312e12, "float32": 19.5e12},
    "TPU v5 lite": {"bfloat16": 197e12},
    "TPU v5": {"bfloat16": 459e12},
    "TPU v4": {"bfloat16": 275e12},
}


def _parse_canvas(text: str):
  h, w = text.split("x")
  return int(h), int(w)


def make_config(method: str, canvases, args):
  """The method's COCO recipe on ``canvases`` (() = the square canvas)."""
  overrides = {k: ast.literal_eval(v) for k, v in
               (kv.split("=", 1) for kv in args.set)}
  c = config_helpers.load_config_file(CONFIGS[method], **{
      "data.train": f"coco:{args.coco_root}:{args.split_name}",
      "data.val": f"coco:{args.coco_root}:{args.split_name}",
      "data.batch_size": args.batch * jax.device_count(),
      "data.num_threads": 2, "model.dtype": args.dtype,
      "eval.score_thresh": args.teacher_score,
      "train.monitor_pseudo_labels": False, **overrides})
  c.data.canvases = canvases
  if canvases:
    c.teacher.canvases = canvases if c.teacher.canvases else ()
  else:
    c.data.canvas = args.square
    c.teacher.canvases = ()
    c.teacher.canvas = args.square if c.teacher.canvas else ()
  config_lib.validate(c)
  return c


def batches_by_canvas(config, count: int, mesh) -> Dict[tuple, List[Any]]:
  """``count`` global batches of each canvas (of a non-empty orientation
  group), from the trainer's own input pipeline."""
  _, batch_iter = loop.make_train_input(config)
  _, sharding = step_lib.shardings(mesh)
  out: Dict[tuple, List[Any]] = {
      c: [] for c, n in zip(batch_iter.canvases, batch_iter.group_counts)
      if n}
  for _ in range(200 * count):
    batch = next(batch_iter)
    canvas = tuple(int(x) for x in batch["image"].shape[1:3])
    if len(out[canvas]) < count:
      out[canvas].append(loop.global_batch(batch, sharding))
    if all(len(v) >= count for v in out.values()):
      break
  return out


def _cost(compiled) -> Dict[str, float]:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  mem = compiled.memory_analysis()
  out = {"flops": float((cost or {}).get("flops", float("nan")))}
  if mem is not None:
    args_b = float(mem.argument_size_in_bytes)
    out_b = float(mem.output_size_in_bytes)
    temp_b = float(mem.temp_size_in_bytes)
    alias_b = float(mem.alias_size_in_bytes)
    out.update(argument_bytes=args_b, output_bytes=out_b, temp_bytes=temp_b,
               alias_bytes=alias_b,
               peak_bytes=args_b + out_b + temp_b - alias_b)
  return out


def _time(fn, args_list, warmup: int, carry_state: bool = False):
  """Median seconds of ``fn`` over ``args_list`` after ``warmup`` calls."""
  times = []
  state = None
  for i, args in enumerate(args_list):
    if carry_state and state is not None:
      args = (state,) + tuple(args[1:])
    t0 = time.perf_counter()
    out = fn(*args)
    jax.block_until_ready(out)
    if i >= warmup:
      times.append(time.perf_counter() - t0)
    if carry_state:
      state = out[0]
  return statistics.median(times), times, out


def bench_canvases(method: str, canvases, args, mesh) -> Dict[str, Any]:
  """Compiles and times the train step on each canvas of one config."""
  c = make_config(method, canvases, args)
  model, tx, schedule = loop.build_model_and_optimizer(c)
  batches = batches_by_canvas(c, args.warmup + args.steps, mesh)
  fn = step_lib.jit_train_step(
      step_lib.make_train_step(model, tx, schedule, c), mesh)
  per_canvas = {}
  for canvas, bs in sorted(batches.items()):
    state = loop.init_state(c, model, tx, mesh)
    t0 = time.perf_counter()
    compiled = fn.lower(state, bs[0]).compile()
    compile_s = time.perf_counter() - t0
    cost = _cost(compiled)
    step_s, times, (_, metrics) = _time(
        compiled, [(state, b) for b in bs], args.warmup, carry_state=True)
    per_canvas["x".join(map(str, canvas))] = dict(
        canvas=list(canvas), compile_s=compile_s, step_s=step_s,
        times=times, **cost,
        loss=float(metrics["loss"]),
        teacher_detections=float(metrics.get("teacher_detections",
                                             float("nan"))))
  return {"config": CONFIGS[method], "canvases": per_canvas}


def orientation_shares(method: str, args) -> Dict[str, float]:
  c = make_config(method, args.orientation, args)
  source = pipeline.make_source(c.data.train, shapes_cfg=c.data.shapes)
  groups = pipeline.orientation_groups(source, 2)
  n = sum(len(g) for g in groups)
  return {"x".join(map(str, cv)): len(g) / n
          for cv, g in zip(args.orientation, groups)}


def per_image(result, shares, batch: int) -> Dict[str, float]:
  """Share-weighted FLOPs and seconds per image of a canvases result."""
  flops = sum(shares.get(k, 1.0) * v["flops"]
              for k, v in result["canvases"].items()) / batch
  secs = sum(shares.get(k, 1.0) * v["step_s"]
             for k, v in result["canvases"].items()) / batch
  return {"flops_per_image": flops, "seconds_per_image": secs,
          "img_per_s": 1.0 / secs}


def split_boxinst(args, mesh) -> Dict[str, Any]:
  """Cumulative, separately jitted pieces of BoxInst's step (one batch)."""
  c = make_config("boxinst", args.orientation, args)
  model, tx, schedule = loop.build_model_and_optimizer(c)
  batch = batches_by_canvas(c, 1, mesh)[args.orientation[0]][0]
  state = loop.init_state(c, model, tx, mesh)
  kwargs = step_lib.loss_kwargs(c)
  terms = step_lib.get_method(c).mask_terms(c)
  image = step_lib.normalize_image(batch["image"], c.model)

  def apply(params, **kw):
    return model.apply({"params": params, "batch_stats": state.batch_stats},
                       image, train=True, mutable=["batch_stats"], **kw)[0]

  def mean_sum(tree):
    return sum(jnp.mean(x.astype(jnp.float32))
               for x in jax.tree_util.tree_leaves(tree))

  def losses(params, mask_terms):
    outputs = apply(params)
    return condinst_losses.condinst_losses(
        outputs, None, batch, mask_terms=mask_terms, step=state.step,
        rng=state.rng, **kwargs)[0]

  targets_fn = lambda b: condinst_losses.batch_targets(  # noqa: E731
      b, num_classes=c.model.num_classes,
      sizes_of_interest=kwargs["sizes_of_interest"],
      center_sampling_radius=kwargs["center_sampling_radius"])
  pieces = [
      ("backbone_fpn", jax.value_and_grad(
          lambda p: mean_sum(apply(p, pyramid_only=True))), (state.params,)),
      ("network", jax.value_and_grad(lambda p: mean_sum(apply(p))),
       (state.params,)),
      ("targets", targets_fn, (batch,)),
      ("losses_without_mask_terms", jax.value_and_grad(
          lambda p: losses(p, ())), (state.params,)),
      ("losses", jax.value_and_grad(lambda p: losses(p, terms)),
       (state.params,)),
  ]
  out = {}
  for name, fn, fn_args in pieces:
    compiled = jax.jit(fn).lower(*fn_args).compile()
    secs, _, _ = _time(compiled, [fn_args] * (1 + args.split_steps), 1)
    out[name] = dict(seconds=secs, **_cost(compiled))
  step = step_lib.jit_train_step(
      step_lib.make_train_step(model, tx, schedule, c), mesh)
  compiled = step.lower(state, batch).compile()
  cost = _cost(compiled)
  secs, _, _ = _time(compiled, [(state, batch)] * (1 + args.split_steps), 1,
                     carry_state=True)
  out["train_step"] = dict(seconds=secs, **cost)
  return {"canvas": list(args.orientation[0]), "cumulative": out,
          "parts": derive_parts(out)}


def derive_parts(cumulative: Dict[str, Dict[str, float]]
                 ) -> Dict[str, Dict[str, float]]:
  """The step's parts as differences of the cumulative pieces.

  The chain is backbone_fpn -> losses_without_mask_terms -> losses ->
  train_step (each contains the one before). `network` (every head output
  on every location, mask branch included) is not on it: the losses
  without mask terms never read the mask branch, so XLA drops it there.
  Seconds of a difference can come out negative where the two timings'
  noise exceeds the part (the update on a CPU); FLOPs cannot.
  """
  c = cumulative
  diff = lambda a, b, sub=None: {  # noqa: E731
      k: c[a][k] - c[b][k] - (c[sub][k] if sub else 0.0)
      for k in ("seconds", "flops")}
  return {
      "backbone_fpn": {k: c["backbone_fpn"][k] for k in ("seconds", "flops")},
      "targets": {k: c["targets"][k] for k in ("seconds", "flops")},
      "fcos_heads_losses_and_controllers": diff(
          "losses_without_mask_terms", "backbone_fpn", "targets"),
      "mask_branch_and_terms": diff("losses", "losses_without_mask_terms"),
      "update_and_guard": diff("train_step", "losses"),
  }


def split_teacher(args, mesh) -> Dict[str, Any]:
  """BoxSeg's front half (teacher EMA, forward, QAM, PC) jitted alone."""
  c = make_config("boxseg", args.orientation, args)
  model, tx, _ = loop.build_model_and_optimizer(c)
  batch = batches_by_canvas(c, 1, mesh)[args.orientation[0]][0]
  state = loop.init_state(c, model, tx, mesh)
  fn = jax.jit(lambda s, b: step_lib.make_student_batch_fn(model, c)(s, b))
  compiled = fn.lower(state, batch).compile()
  secs, _, _ = _time(compiled, [(state, batch)] * (1 + args.split_steps), 1)
  return {"canvas": list(args.orientation[0]), "seconds": secs,
          **_cost(compiled)}


def bf16_check(args, mesh) -> Dict[str, Any]:
  """One step's losses, bf16 compute vs f32, same state and batch."""
  out = {}
  for dtype in ("float32", "bfloat16"):
    a = argparse.Namespace(**{**vars(args), "dtype": dtype})
    c = make_config("boxinst", args.orientation, a)
    model, tx, schedule = loop.build_model_and_optimizer(c)
    batch = batches_by_canvas(c, 1, mesh)[args.orientation[0]][0]
    state = loop.init_state(c, model, tx, mesh)
    step = step_lib.jit_train_step(
        step_lib.make_train_step(model, tx, schedule, c), mesh)
    _, metrics = step(state, batch)
    out[dtype] = {k: float(v) for k, v in metrics.items()
                  if k.startswith("loss")}
  rel = {k: abs(out["bfloat16"][k] - v) / max(abs(v), 1e-6)
         for k, v in out["float32"].items()}
  return {"losses": out, "relative_difference": rel,
          "max_relative_difference": max(rel.values())}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--methods", default="boxinst,boxseg")
  parser.add_argument("--batch", type=int, default=1, help="per device")
  parser.add_argument("--dtype", default="float32",
                      choices=("float32", "bfloat16"))
  parser.add_argument("--warmup", type=int, default=1)
  parser.add_argument("--steps", type=int, default=2)
  parser.add_argument("--split", type=int, default=1,
                      help="1: time the step's pieces (separate jits)")
  parser.add_argument("--split_steps", type=int, default=1)
  parser.add_argument("--bf16_check", type=int, default=1)
  parser.add_argument("--teacher_score", type=float, default=0.0)
  parser.add_argument("--coco_root", default=os.path.join(
      REPO, "..", "shared", "data", "coco-mini"))
  parser.add_argument("--split_name", default="train2017")
  parser.add_argument("--orientation", default="800x1344,1344x800",
                      help="landscape HxW, portrait HxW")
  parser.add_argument("--square", default="1344x1344", help="baseline HxW")
  parser.add_argument("--set", action="append", default=[],
                      help="KEY=PYTHON_VALUE config override (repeatable), "
                      "e.g. --set model.resnet_num_blocks='(1,1,1,1)'")
  parser.add_argument("--output", default="")
  args = parser.parse_args()
  args.square = _parse_canvas(args.square)
  args.orientation = tuple(_parse_canvas(t)
                           for t in args.orientation.split(","))
  mesh = step_lib.make_mesh(-1)
  device = jax.devices()[0]
  kind = device.device_kind
  peak = PEAK_FLOPS.get(kind, {}).get(args.dtype)
  methods = args.methods.split(",")
  shares = orientation_shares(methods[0], args)
  print(f"{kind} ({jax.device_count()} device(s)), batch {args.batch} per "
        f"device, {args.dtype}; photo shares {shares}", flush=True)
  results: Dict[str, Any] = {}
  for method in methods:
    res = {}
    for name, canvases in (("square", ()), ("orientation", args.orientation)):
      r = bench_canvases(method, canvases, args, mesh)
      r.update(per_image(r, shares if canvases else {}, args.batch))
      if peak:
        r["mfu"] = r["flops_per_image"] * r["img_per_s"] / peak
      res[name] = r
      for k, v in r["canvases"].items():
        print(f"  {method:<8} {name:<11} canvas {k:<9} step "
              f"{v['step_s']:.3f} s, {v['flops'] / 1e12:.3f} TFLOP, peak "
              f"{v.get('peak_bytes', float('nan')) / 2**30:.2f} GiB, compile "
              f"{v['compile_s']:.0f} s", flush=True)
    o, s = res["orientation"], res["square"]
    res["flops_per_image_ratio"] = o["flops_per_image"] / s["flops_per_image"]
    res["time_per_image_ratio"] = (o["seconds_per_image"] /
                                   s["seconds_per_image"])
    print(f"  {method}: per image orientation / square: FLOPs "
          f"{res['flops_per_image_ratio']:.3f}, time "
          f"{res['time_per_image_ratio']:.3f}; img/s {o['img_per_s']:.3f} "
          f"vs {s['img_per_s']:.3f}" + (f"; MFU {o['mfu']:.3f}" if peak
                                        else ""), flush=True)
    results[method] = res
  base = results.get("boxinst", results[methods[0]])
  out = {"device": kind, "platform": device.platform,
         "num_devices": jax.device_count(), "host": platform.node(),
         "batch_per_device": args.batch, "dtype": args.dtype,
         "peak_flops": peak, "photo_shares": shares,
         "flops_per_image_ratio": base["flops_per_image_ratio"],
         "time_per_image_ratio": base["time_per_image_ratio"],
         "methods": results}
  if args.split:
    out["split_boxinst"] = split_boxinst(args, mesh)
    for k, v in out["split_boxinst"]["parts"].items():
      print(f"  split {k:<46} {v['seconds']:.3f} s "
            f"{v['flops'] / 1e9:.2f} GFLOP", flush=True)
    if "boxseg" in methods:
      out["split_boxseg_teacher"] = split_teacher(args, mesh)
      t = out["split_boxseg_teacher"]
      print(f"  split boxseg teacher+QAM+PC {t['seconds']:.3f} s "
            f"{t['flops'] / 1e9:.2f} GFLOP", flush=True)
  if args.bf16_check:
    out["bf16_check"] = bf16_check(args, mesh)
    print(f"  bf16 vs f32 losses: max relative difference "
          f"{out['bf16_check']['max_relative_difference']:.2e}", flush=True)
  path = args.output or os.path.join(
      REPO, "benchmarks", "results",
      f"train_throughput_{device.platform}.json")
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump(out, f, indent=2)
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
