r"""Multi-process data parallelism on CPU: per-process input, collectives.

Starts `P` local processes for each `P` of `--processes` (default 2 and
4), each with one CPU device, joined by `jax.distributed.initialize`, and
runs the trainer's own pieces: `loop.make_train_input` (this process'
shard of the global batch), `loop.global_batch`, the jitted train step over
the `data` mesh of all `P` devices. Each process reports the records it
loaded, its local batch shape, and, from the compiled step's HLO, every
cross-device collective (kind, count, bytes moved per device per step);
step time is the median of `--steps` steps. Weak scaling: the global batch
is `--per_process_batch * P`.

On this 2-core machine 4 processes oversubscribe the cores, so the step
times say nothing about scaling; the point is the program: which
collectives a step runs and how many bytes they carry (docs/scaling.md
turns those bytes into times on real interconnects).

  python benchmarks/scaling.py --processes=2,4 --config=tiny
  python benchmarks/scaling.py --processes=2 --config=tiny:boxseg_pc
Writes JSON to benchmarks/results/scaling_cpu.json.
"""

import argparse
import collections
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter",
               "collective-permute", "all-to-all")
_BYTES = {"f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2, "pred": 1,
          "s8": 1, "u8": 1, "f64": 8, "s64": 8, "u64": 8}


def _shape_bytes(shape_text):
  total = 0
  for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", shape_text):
    n = 1
    for d in filter(None, dims.split(",")):
      n *= int(d)
    total += n * _BYTES.get(dtype, 4)
  return total


def count_collectives(hlo_text):
  """{kind: {"count", "bytes"}} of the collectives in compiled HLO text
  (async pairs counted once, at their `-start`)."""
  out = collections.defaultdict(lambda: {"count": 0, "bytes": 0})
  for line in hlo_text.splitlines():
    m = re.search(r"=\s*(.+?)\s+(" + "|".join(COLLECTIVES) +
                  r")(-start)?\(", line)
    if m and "-done(" not in line:
      out[m.group(2)]["count"] += 1
      out[m.group(2)]["bytes"] += _shape_bytes(m.group(1))
  return dict(out)


def worker(args):
  import jax  # pylint: disable=g-import-not-at-top
  jax.distributed.initialize(coordinator_address=f"localhost:{args.port}",
                             num_processes=args.num_processes,
                             process_id=args.process_id)
  import numpy as np  # pylint: disable=g-import-not-at-top
  from boxseg_jax import config_helpers  # pylint: disable=g-import-not-at-top
  from boxseg_jax.train import loop  # pylint: disable=g-import-not-at-top
  from boxseg_jax.train import step as step_lib  # pylint: disable=g-import-not-at-top
  p, i = jax.process_count(), jax.process_index()
  name, _, arg = args.config.partition(":")
  c = config_helpers.load_config_file(name, arg or None, **{
      "data.batch_size": args.per_process_batch * p,
      "data.num_threads": 1})
  mesh = step_lib.make_mesh(-1)
  model, tx, schedule = loop.build_model_and_optimizer(c)
  state = loop.init_state(c, model, tx, mesh)
  source, it = loop.make_train_input(c, i, p)
  _, sharding = step_lib.shardings(mesh)
  step = step_lib.jit_train_step(
      step_lib.make_train_step(model, tx, schedule, c), mesh)
  first = next(it)
  batch = loop.global_batch(first, sharding)
  compiled = step.lower(state, batch).compile()
  hlo = compiled.as_text()
  times = []
  for k in range(args.steps + 1):
    t0 = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    if k:
      times.append(time.perf_counter() - t0)
    batch = loop.global_batch(next(it), sharding)
  params = jax.tree.leaves(state.params)
  result = {
      "process": i, "num_processes": p,
      "devices": [str(d) for d in jax.devices()],
      "local_devices": [str(d) for d in jax.local_devices()],
      "local_batch_shape": list(first["image"].shape),
      "global_batch_shape": list(batch["image"].shape),
      "local_image_ids": [int(x) for x in first["image_id"]],
      "param_bytes": int(sum(x.size * x.dtype.itemsize for x in params)),
      "collectives": count_collectives(hlo),
      "step_s": statistics.median(times),
      "loss": float(metrics["loss"])}
  if args.dump_hlo:
    path = os.path.join(args.dump_hlo, f"step_p{p}_{i}.hlo.txt")
    with open(path, "w") as f:
      f.write(hlo)
    result["hlo"] = path
  print("RESULT " + json.dumps(result), flush=True)
  del np


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def launch(num, args):
  port = _free_port()
  env = dict(os.environ)
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if "force_host_platform_device_count" not in f]
  env["XLA_FLAGS"] = " ".join(flags +
                              ["--xla_force_host_platform_device_count=1"])
  procs = [subprocess.Popen(
      [sys.executable, __file__, "--worker", f"--port={port}",
       f"--num_processes={num}", f"--process_id={i}",
       f"--config={args.config}", f"--steps={args.steps}",
       f"--per_process_batch={args.per_process_batch}",
       f"--dump_hlo={args.dump_hlo}"],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
      text=True) for i in range(num)]
  results = []
  for proc in procs:
    out, _ = proc.communicate(timeout=args.timeout)
    lines = [l for l in out.splitlines() if l.startswith("RESULT ")]
    if proc.returncode or not lines:
      raise RuntimeError(f"worker failed ({proc.returncode}):\n{out[-3000:]}")
    results.append(json.loads(lines[-1][len("RESULT "):]))
  return sorted(results, key=lambda r: r["process"])


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--processes", default="2,4")
  p.add_argument("--config", default="tiny")
  p.add_argument("--per_process_batch", type=int, default=2)
  p.add_argument("--steps", type=int, default=3)
  p.add_argument("--timeout", type=int, default=1800)
  p.add_argument("--dump_hlo", default="")
  p.add_argument("--output", default=os.path.join(
      REPO, "benchmarks", "results", "scaling_cpu.json"))
  p.add_argument("--worker", action="store_true")
  p.add_argument("--port", type=int, default=0)
  p.add_argument("--num_processes", type=int, default=1)
  p.add_argument("--process_id", type=int, default=0)
  args = p.parse_args()
  if args.worker:
    worker(args)
    return
  if args.dump_hlo:
    os.makedirs(args.dump_hlo, exist_ok=True)
  runs = {}
  for num in (int(x) for x in args.processes.split(",")):
    res = launch(num, args)
    runs[str(num)] = res
    ids = [set(r["local_image_ids"]) for r in res]
    disjoint = all(not (a & b) for k, a in enumerate(ids)
                   for b in ids[k + 1:])
    print(f"{num} processes: local batch {res[0]['local_batch_shape']} -> "
          f"global {res[0]['global_batch_shape']}, first-batch image ids "
          f"disjoint across processes: {disjoint}, step "
          f"{statistics.median(r['step_s'] for r in res):.3f} s")
    for kind, v in sorted(res[0]["collectives"].items()):
      print(f"  {kind}: {v['count']} op(s), {v['bytes'] / 2**20:.2f} MiB "
            f"per device per step (params {res[0]['param_bytes'] / 2**20:.2f}"
            " MiB)")
  os.makedirs(os.path.dirname(args.output), exist_ok=True)
  with open(args.output, "w") as f:
    json.dump({"benchmark": "scaling", "config": args.config,
               "per_process_batch": args.per_process_batch,
               "host_cpus": os.cpu_count(), "runs": runs}, f, indent=2)
  print(f"wrote {args.output}")


if __name__ == "__main__":
  main()
