r"""Benchmark: CondInst forward+backward step, and the BoxInst pairwise term.

Section 1 times one jitted `value_and_grad` of CondInst (train mode, mask
branch batch statistics) at 800x1344 (batch 2 by default): compile time, the
median step time after warm-up, and XLA's FLOP estimate from
`jax.jit(f).lower(...).compile().cost_analysis()`.

Section 2 times `boxseg_jax.losses.boxinst.pairwise_loss_map` (16 instances x
200x336, size 3, dilation 2; forward and forward+backward of a weighted sum)
against a naive "unfold" formulation written here, as AdelaiDet's
`compute_pairwise_term` does it: the zero-padded `[n, 9, h, w]` neighbourhood
tensors of the fg/bg log-probabilities are materialised (two variants: pad +
9 stacked slices, and `lax.conv_general_dilated_patches`, JAX's analogue of
`torch.nn.functional.unfold`), the centre dropped, then the reference's
max-shifted log-sum-exp. All must agree; ratios are printed. The PyTorch
reference on these 2 CPU cores is quoted from docs/design.md (0.42 s
forward+backward, 0.15 s forward).

Usage:
  python benchmarks/model_step.py [--batch 2] [--height 800] [--width 1344] \
      [--depth 50] [--dtype float32] [--steps 3] \
      [--output benchmarks/results/model_step.json] [--skip_model] \
      [--skip_pairwise]
"""

import argparse
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from boxseg_jax.modeling.condinst import CondInst
from boxseg_jax.modeling.param_count import count_params

# PyTorch reference for the pairwise term, 16 x 200x336 on these 2 cores
# (docs/design.md, "Benchmark baselines").
TORCH_PAIRWISE_FWD_BWD_S = 0.42
TORCH_PAIRWISE_FWD_S = 0.15


def _block(tree):
  return jax.block_until_ready(tree)


def _time_calls(fn, args, warmup, steps):
  for _ in range(warmup):
    _block(fn(*args))
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    _block(fn(*args))
    times.append(time.perf_counter() - t0)
  return times


def _flops(compiled):
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax: one dict per computation
    cost = cost[0] if cost else {}
  return float(cost.get("flops", float("nan"))) if cost else float("nan")


def bench_model(args):
  dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[args.dtype]
  model = CondInst(num_classes=80, depth=args.depth, dtype=dtype)
  # Parameter shapes do not depend on the input size: initialise small.
  variables = jax.jit(lambda k: model.init(
      k, jnp.zeros((1, 64, 64, 3)), train=False))(jax.random.key(0))
  shape = (args.batch, args.height, args.width, 3)
  image = jax.random.normal(jax.random.key(1), shape, jnp.float32)

  def step(params, batch_stats, image):
    def loss_fn(p):
      out, new = model.apply({"params": p, "batch_stats": batch_stats},
                             image, train=True, mutable=["batch_stats"])
      # A scalar touching every output, so that every branch is differentiated.
      loss = sum(jnp.mean(jnp.square(v)) for v in out.values())
      return loss, new["batch_stats"]
    (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params)
    return loss, grads, new_stats

  jitted = jax.jit(step)
  t0 = time.perf_counter()
  compiled = jitted.lower(variables["params"], variables["batch_stats"],
                          image).compile()
  compile_s = time.perf_counter() - t0
  flops = _flops(compiled)
  call_args = (variables["params"], variables["batch_stats"], image)
  times = _time_calls(compiled, call_args, args.warmup, args.steps)
  loss, grads, _ = compiled(*call_args)
  finite = bool(np.isfinite(float(loss))) and all(
      np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
  median = statistics.median(times)
  return {
      "depth": args.depth, "batch": args.batch,
      "image_hw": [args.height, args.width], "dtype": args.dtype,
      "num_params": count_params(variables["params"]),
      "compile_s": compile_s, "step_times_s": times,
      "step_median_s": median,
      "images_per_s": args.batch / median,
      "xla_flops_per_step": flops,
      "achieved_gflops_per_s": flops / median / 1e9,
      "grads_finite": finite,
  }


def _unfold_wo_center_stack(x, size, dilation, pad):
  """torch `unfold` as zero-pad + `size**2` stacked slices: [n, 9, h, w]."""
  h, w = x.shape[-2:]
  xp = jnp.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
  patches = jnp.concatenate(
      [xp[:, :, dy:dy + h, dx:dx + w]
       for dy in range(0, size * dilation, dilation)
       for dx in range(0, size * dilation, dilation)], axis=1)
  center = size * size // 2
  return jnp.concatenate([patches[:, :center], patches[:, center + 1:]],
                         axis=1)


def _unfold_wo_center_patches(x, size, dilation, pad):
  """torch `unfold` via `lax.conv_general_dilated_patches`: [n, 9, h, w]."""
  patches = jax.lax.conv_general_dilated_patches(
      x, filter_shape=(size, size), window_strides=(1, 1),
      padding=((pad, pad), (pad, pad)), rhs_dilation=(dilation, dilation),
      dimension_numbers=("NCHW", "OIHW", "NCHW"))
  center = size * size // 2
  return jnp.concatenate([patches[:, :center], patches[:, center + 1:]],
                         axis=1)


def make_naive_pairwise(unfold_fn):
  """Reference-style pairwise map through an explicit unfold.

  `[n, h, w] -> [n, 8, h, w]`: the zero-padded neighbourhood tensor is
  materialised for the fg and bg log-probabilities, as AdelaiDet's
  `compute_pairwise_term` does with `unfold_wo_center`.
  """
  def naive(logits, size=3, dilation=2):
    logits = logits.astype(jnp.float32)[:, None]  # [n, 1, h, w]
    pad = (size + (dilation - 1) * (size - 1)) // 2
    log_fg = jax.nn.log_sigmoid(logits)
    log_bg = jax.nn.log_sigmoid(-logits)
    same_fg = log_fg + unfold_fn(log_fg, size, dilation, pad)
    same_bg = log_bg + unfold_fn(log_bg, size, dilation, pad)
    m = jnp.maximum(same_fg, same_bg)
    return -(jnp.log(jnp.exp(same_fg - m) + jnp.exp(same_bg - m)) + m)
  return naive


def bench_pairwise(args):
  try:
    from boxseg_jax.losses.boxinst import pairwise_loss_map
  except ImportError as e:
    return {"error": f"boxseg_jax.losses.boxinst.pairwise_loss_map not "
                     f"available: {e}"}
  n, h, w = 16, 200, 336
  key_logits, key_weight = jax.random.split(jax.random.key(2))
  logits = 3.0 * jax.random.normal(key_logits, (n, h, w), jnp.float32)
  weight = jax.random.uniform(key_weight, (n, 8, h, w), jnp.float32)

  def make(fn):
    fwd = jax.jit(lambda z: fn(z, 3, 2))
    fwd_bwd = jax.jit(jax.value_and_grad(
        lambda z: jnp.sum(fn(z, 3, 2) * weight)))
    return fwd, fwd_bwd

  variants = {
      "ours": pairwise_loss_map,
      "naive_stack": make_naive_pairwise(_unfold_wo_center_stack),
      "naive_patches": make_naive_pairwise(_unfold_wo_center_patches),
  }
  result = {"shape": [n, h, w], "size": 3, "dilation": 2}
  same = True
  for name, fn in variants.items():  # "ours" first: the values to match.
    fwd, fb = make(fn)
    out, grad = np.asarray(fwd(logits)), np.asarray(fb(logits)[1])
    if name == "ours":
      ref_out, ref_grad = out, grad
    else:
      result[name + "_max_abs_diff"] = float(np.abs(out - ref_out).max())
      result[name + "_max_abs_grad_diff"] = float(
          np.abs(grad - ref_grad).max())
      same &= bool(np.allclose(out, ref_out, rtol=1e-5, atol=1e-5)
                   and np.allclose(grad, ref_grad, rtol=1e-4, atol=1e-5))
    result[name + "_fwd_median_s"] = statistics.median(
        _time_calls(fwd, (logits,), 2, args.pairwise_steps))
    result[name + "_fwd_bwd_median_s"] = statistics.median(
        _time_calls(fb, (logits,), 2, args.pairwise_steps))
  result["same_values"] = same
  for name in ("naive_stack", "naive_patches"):
    for part in ("fwd", "fwd_bwd"):
      result[f"{name}_over_ours_{part}"] = (
          result[f"{name}_{part}_median_s"] / result[f"ours_{part}_median_s"])
  result["torch_reference_fwd_s"] = TORCH_PAIRWISE_FWD_S
  result["torch_reference_fwd_bwd_s"] = TORCH_PAIRWISE_FWD_BWD_S
  result["torch_over_ours_fwd_bwd"] = (TORCH_PAIRWISE_FWD_BWD_S
                                       / result["ours_fwd_bwd_median_s"])
  return result


def _print_model(r):
  print("\n== CondInst R-%d forward+backward, batch %d, %dx%d, %s ==" % (
      r["depth"], r["batch"], r["image_hw"][0], r["image_hw"][1], r["dtype"]))
  rows = [
      ("parameters", f"{r['num_params']:,}"),
      ("compile (s)", f"{r['compile_s']:.1f}"),
      ("step median (s)", f"{r['step_median_s']:.2f}"),
      ("steps (s)", ", ".join(f"{t:.2f}" for t in r["step_times_s"])),
      ("images / s", f"{r['images_per_s']:.3f}"),
      ("XLA FLOPs / step", f"{r['xla_flops_per_step'] / 1e12:.3f} T"),
      ("achieved", f"{r['achieved_gflops_per_s']:.1f} GFLOP/s"),
      ("gradients finite", str(r["grads_finite"])),
  ]
  for k, v in rows:
    print(f"  {k:<20} {v}")


def _print_pairwise(r):
  print("\n== BoxInst pairwise term, 16 x 200x336, size 3, dilation 2 ==")
  if "error" in r:
    print("  skipped:", r["error"])
    return
  rows = (("ours (shifted slices)", "ours"),
          ("naive unfold: pad+stack", "naive_stack"),
          ("naive unfold: conv patches", "naive_patches"))
  print(f"  {'':<28} {'forward (s)':>12} {'fwd+bwd (s)':>12} {'ratio':>7}")
  for label, key in rows:
    ratio = r[f"{key}_fwd_bwd_median_s"] / r["ours_fwd_bwd_median_s"]
    print(f"  {label:<28} {r[key + '_fwd_median_s']:>12.4f} "
          f"{r[key + '_fwd_bwd_median_s']:>12.4f} {ratio:>6.2f}x")
  print(f"  {'PyTorch (docs/design.md)':<28} "
        f"{r['torch_reference_fwd_s']:>12.4f} "
        f"{r['torch_reference_fwd_bwd_s']:>12.4f} "
        f"{r['torch_reference_fwd_bwd_s'] / r['ours_fwd_bwd_median_s']:>6.2f}x")
  print("  (ratio = time / ours, forward+backward)")
  print(f"  same values as ours: {r['same_values']} (max |diff| "
        f"{r['naive_stack_max_abs_diff']:.2e} / "
        f"{r['naive_patches_max_abs_diff']:.2e}, grads "
        f"{r['naive_stack_max_abs_grad_diff']:.2e} / "
        f"{r['naive_patches_max_abs_grad_diff']:.2e})")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--height", type=int, default=800)
  parser.add_argument("--width", type=int, default=1344)
  parser.add_argument("--depth", type=int, default=50, choices=(50, 101))
  parser.add_argument("--dtype", default="float32",
                      choices=("float32", "bfloat16"))
  parser.add_argument("--warmup", type=int, default=1)
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--pairwise_steps", type=int, default=10)
  parser.add_argument("--skip_model", action="store_true")
  parser.add_argument("--skip_pairwise", action="store_true")
  parser.add_argument("--output", default=os.path.join(
      os.path.dirname(__file__), "results", "model_step.json"))
  args = parser.parse_args()

  results = {"jax": jax.__version__, "backend": jax.default_backend(),
             "devices": [str(d) for d in jax.devices()],
             "cpu_count": os.cpu_count(), "machine": platform.machine()}
  if not args.skip_model:
    results["model_step"] = bench_model(args)
    _print_model(results["model_step"])
  if not args.skip_pairwise:
    results["pairwise"] = bench_pairwise(args)
    _print_pairwise(results["pairwise"])
  os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
  with open(args.output, "w") as f:
    json.dump(results, f, indent=2)
  print(f"\nwrote {args.output}")


if __name__ == "__main__":
  main()
