r"""MaskCut eigen-solve benchmark: our jnp paths vs the SciPy reference.

  python benchmarks/maskcut.py [--grid=60] [--dim=768] [--scenes=1]
      [--batch=1] [--vit] [--output=benchmarks/results/maskcut.json]

Same planted-object features (`reference.synthetic_features`, 60 x 60 patches
= 3600 nodes, 768-dim, 3 masks) for every path; one timed run each by default
(`--repeats=k` reports the minimum of k; JAX paths are compiled and run once
before timing, compile time is reported apart):

* `scipy_dense`: the reference (CutLER) path, `scipy.linalg.eigh(D - A, D,
  subset_by_index=[1, 2])` per cut, `ndimage.label` on the host;
* `scipy_eigsh`: the same loop with ARPACK `eigsh(k=2)` on D^-1/2 A D^-1/2,
  the strongest SciPy alternative;
* `jax_eigh`: our jitted `maskcut_batch`, dense `jnp.linalg.eigh`, float64;
* `jax_lobpcg`: the same with LOBPCG on the top-2 of D^-1/2 A D^-1/2
  (float64, tolerance stop; the config default for solver=lobpcg);
* `jax_lobpcg_defl`: LOBPCG, block 1, with the known top vector deflated;
* `jax_lobpcg_f32`: LOBPCG top-2 in float32, fixed 100 iterations;
* `jax_lobpcg_defl_f32`: deflated LOBPCG in float32 with a reachable
  tolerance (1e-9: residual < 1e-9 * 10 n (theta + |Mx|), ~7e-5 at n = 3600);
* `jax_lanczos_f32`: deflated Lanczos (full reorthogonalisation, Ritz
  residual stop, cap 48 steps) in float32, the accelerator path.

Iterations per cut are reported per path (`solver_iters`, with each path's
cap in `solver_caps`; LOBPCG iterations and Lanczos steps = matrix-vector
products are not the same unit).

Per path: seconds per image (3 masks), ratio to `scipy_dense` and to
`scipy_eigsh`, and the IoU of every mask with the reference's. Also one cut's
solver-only time per path. `--vit` adds the ViT-B/8 forward at 480 x 480.
"""

import json
import os
import platform
import sys
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from boxseg_jax.maskcut import maskcut
from boxseg_jax.maskcut import ncut
from boxseg_jax.maskcut import reference
from boxseg_jax.maskcut import vit

_GRID = flags.DEFINE_integer("grid", 60, "Patch grid side.")
_DIM = flags.DEFINE_integer("dim", 768, "Feature width.")
_SCENES = flags.DEFINE_integer("scenes", 1, "Scenes (seeds) to time.")
_BATCH = flags.DEFINE_integer(
    "batch", 1, "Images per jitted call for the JAX paths (vmap).")
_VIT = flags.DEFINE_bool("vit", False, "Also time the ViT-B/8 forward.")
_REPEATS = flags.DEFINE_integer(
    "repeats", 1, "Timed runs per path; the minimum is reported (use > 1 on "
    "a shared, noisy machine).")
_NOTE = flags.DEFINE_string(
    "note", "", "Free text stored in the JSON setup (e.g. machine load).")
_OUTPUT = flags.DEFINE_string(
    "output", os.path.join(os.path.dirname(__file__), "results",
                           "maskcut.json"), "JSON result file.")

TAU = 0.15
JAX_PATHS = {
    "jax_eigh": dict(solver="eigh", solve_dtype="float64"),
    "jax_lobpcg": dict(solver="lobpcg", solve_dtype="float64",
                       lobpcg_iters=200),
    "jax_lobpcg_defl": dict(solver="lobpcg", solve_dtype="float64",
                            lobpcg_iters=200, lobpcg_deflate=True),
    "jax_lobpcg_f32": dict(solver="lobpcg", solve_dtype="float32",
                           lobpcg_iters=100, lobpcg_tol=1e-12),
    "jax_lobpcg_defl_f32": dict(solver="lobpcg", solve_dtype="float32",
                                lobpcg_iters=100, lobpcg_deflate=True,
                                lobpcg_tol=1e-9),
    "jax_lanczos_f32": dict(solver="lanczos", solve_dtype="float32",
                            lanczos_steps=48),
}
SCIPY_PATHS = {
    "scipy_dense": reference.fiedler_scipy_dense,
    "scipy_eigsh": reference.fiedler_scipy_eigsh,
}


def _iou(a, b):
  union = np.sum(a | b)
  return 1.0 if union == 0 else float(np.sum(a & b) / union)


def _time_jax_path(name, feats_batch, dims):
  kwargs = JAX_PATHS[name]
  fn = jax.jit(lambda f: maskcut.maskcut_batch(f, dims, dims, tau=TAU,
                                               **kwargs))
  with ncut.precision_scope(kwargs["solve_dtype"]):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(feats_batch))
    first = time.perf_counter() - t0
    runs = []
    for _ in range(_REPEATS.value):
      t0 = time.perf_counter()
      out = jax.block_until_ready(fn(feats_batch))
      runs.append(time.perf_counter() - t0)
  return jax.device_get(out), min(runs), max(first - min(runs), 0.0)


def _time_one_cut(feats, dims):
  """Solver-only seconds for the first cut of one image."""
  a64, d64 = reference.affinity_np(feats.T, TAU)
  out = {}
  for name, solver in SCIPY_PATHS.items():
    t0 = time.perf_counter()
    solver(a64, d64)
    out[name] = time.perf_counter() - t0
  for name, kwargs in JAX_PATHS.items():
    dtype = kwargs["solve_dtype"]
    with ncut.precision_scope(dtype):
      a = jnp.asarray(a64, ncut.DTYPES[dtype])
      if kwargs["solver"] == "eigh":
        fn = jax.jit(lambda m: ncut.fiedler_eigh(m)[0])
      elif kwargs["solver"] == "lanczos":
        fn = jax.jit(lambda m, kw=kwargs: ncut.fiedler_lanczos(
            m, num_steps=kw["lanczos_steps"], tol=kw.get("lanczos_tol"))[0])
      else:
        fn = jax.jit(lambda m, kw=kwargs: ncut.fiedler_lobpcg(
            m, num_iters=kw["lobpcg_iters"], tol=kw.get("lobpcg_tol"),
            deflate=kw.get("lobpcg_deflate", False))[0])
      jax.block_until_ready(fn(a))
      t0 = time.perf_counter()
      jax.block_until_ready(fn(a))
      out[name] = time.perf_counter() - t0
  del dims
  return out


def _time_vit():
  model = vit.make_vit("vit_base8")
  x = jnp.zeros((1, 480, 480, 3), jnp.float32)
  params = jax.jit(vit.make_vit("vit_base8", features_only=False).init)(
      jax.random.PRNGKey(0), x)["params"]
  fn = jax.jit(lambda p, im: model.apply({"params": p}, im)["k"])
  jax.block_until_ready(fn(params, x))
  t0 = time.perf_counter()
  jax.block_until_ready(fn(params, x))
  return time.perf_counter() - t0


def main(argv):
  del argv
  dims = (_GRID.value, _GRID.value)
  scenes = [reference.synthetic_features(s, dims, _DIM.value, num_objects=3)[0]
            for s in range(_SCENES.value)]
  result = {
      "setup": dict(grid=list(dims), nodes=dims[0] * dims[1], dim=_DIM.value,
                    num_masks=3, tau=TAU, scenes=_SCENES.value,
                    batch=_BATCH.value, repeats=_REPEATS.value,
                    device=str(jax.devices()[0].device_kind),
                    platform=jax.default_backend(),
                    cpu_count=os.cpu_count(), machine=platform.machine(),
                    python=sys.version.split()[0], jax=jax.__version__,
                    note=_NOTE.value,
                    load_average_start=list(os.getloadavg())),
      "seconds_per_image": {}, "compile_seconds": {}, "solver_iters": {},
      "mask_iou_vs_scipy_dense": {}, "one_cut_seconds": {},
      "solver_caps": {k: v.get("lanczos_steps", v.get("lobpcg_iters", 0))
                      for k, v in JAX_PATHS.items()},
  }
  ref_masks = {}
  for name, solver in SCIPY_PATHS.items():
    runs = []
    for _ in range(_REPEATS.value):
      t0 = time.perf_counter()
      outs = [reference.maskcut_np(f, dims, TAU, solver=solver,
                                   tie_rtol=1e-5) for f in scenes]
      runs.append((time.perf_counter() - t0) / len(scenes))
    result["seconds_per_image"][name] = min(runs)
    ref_masks[name] = [np.stack(o["masks"]) for o in outs]
    print(f"{name:16s} {result['seconds_per_image'][name]:8.3f} s/image",
          flush=True)
  for name in JAX_PATHS:
    runs, masks, iters, compile_s = 0.0, [], [], 0.0
    for i in range(0, len(scenes), _BATCH.value):
      chunk = scenes[i:i + _BATCH.value]
      chunk = chunk + [chunk[-1]] * (_BATCH.value - len(chunk))
      out, run, comp = _time_jax_path(name, jnp.asarray(np.stack(chunk)),
                                      dims)
      runs += run
      compile_s = max(compile_s, comp)
      masks += list(out["masks"])
      iters += out["solver_iters"].ravel().tolist()
    n_timed = len(range(0, len(scenes), _BATCH.value)) * _BATCH.value
    result["seconds_per_image"][name] = runs / n_timed
    result["compile_seconds"][name] = compile_s
    result["solver_iters"][name] = iters
    ref_masks[name] = masks[:len(scenes)]
    print(f"{name:16s} {result['seconds_per_image'][name]:8.3f} s/image "
          f"(compile {compile_s:.1f} s, iters {iters})", flush=True)
  base = ref_masks["scipy_dense"]
  for name, masks in ref_masks.items():
    result["mask_iou_vs_scipy_dense"][name] = [
        [_iou(m[i], b[i]) for i in range(3)] for m, b in zip(masks, base)]
  sec = result["seconds_per_image"]
  result["ratio_vs_scipy_dense"] = {k: v / sec["scipy_dense"]
                                    for k, v in sec.items()}
  result["ratio_vs_scipy_eigsh"] = {k: v / sec["scipy_eigsh"]
                                    for k, v in sec.items()}
  result["one_cut_seconds"] = _time_one_cut(scenes[0], dims)
  if _VIT.value:
    result["vit_base8_480_forward_seconds"] = _time_vit()
  result["setup"]["load_average_end"] = list(os.getloadavg())
  print("\npath              s/image  x scipy_dense  x scipy_eigsh  one cut"
        "  min mask IoU vs scipy_dense  max iters / cap")
  for k in sec:
    ious = [v for per in result["mask_iou_vs_scipy_dense"][k] for v in per]
    print(f"{k:16s} {sec[k]:8.3f} {result['ratio_vs_scipy_dense'][k]:13.3f} "
          f"{result['ratio_vs_scipy_eigsh'][k]:14.3f} "
          f"{result['one_cut_seconds'][k]:8.3f}  {min(ious):.4f}"
          f"  {max(result['solver_iters'].get(k, [0]))}"
          f" / {result['solver_caps'].get(k, '-')}")
  if "vit_base8_480_forward_seconds" in result:
    print(f"ViT-B/8 480x480 forward: "
          f"{result['vit_base8_480_forward_seconds']:.2f} s")
  os.makedirs(os.path.dirname(os.path.abspath(_OUTPUT.value)), exist_ok=True)
  with open(_OUTPUT.value, "w") as f:
    json.dump(result, f, indent=1)
  print(f"wrote {_OUTPUT.value}")


if __name__ == "__main__":
  app.run(main)
