r"""Input-pipeline throughput on real COCO photos at 800x1333, two views.

Measures images/s of the training pipeline (decode, ResizeShortestEdge 800 /
max 1333, flip, instance clean-up, teacher view + photometric student view
(strongv2: jitter, grayscale, blur), padding to a 1344x1344 canvas, batching)
on ``../shared/data/coco-mini`` train2017, and the same work done in a plain
sequential Python loop in the same run (the baseline of the ratio).
Goal (issue 2): >= 25 img/s on 2 CPU cores.

  python benchmarks/input_pipeline.py [--threads=2] [--images=320]
"""

import argparse
import json
import os
import pathlib
import platform
import time

import numpy as np

from boxseg_jax.data import coco
from boxseg_jax.data import pipeline
from boxseg_jax.data import transforms

REPO = pathlib.Path(__file__).resolve().parents[1]


def main():
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--root", default=str(REPO.parent / "shared" / "data" /
                                       "coco-mini"))
  p.add_argument("--split", default="train2017")
  p.add_argument("--threads", type=int, default=2)
  p.add_argument("--batch_size", type=int, default=8)
  p.add_argument("--images", type=int, default=320)
  p.add_argument("--output", default=str(REPO / "benchmarks" / "results" /
                                         "input_pipeline.json"))
  args = p.parse_args()

  src = coco.CocoSource(args.root, args.split)
  tcfg = transforms.TransformConfig(
      canvas=(1344, 1344), max_instances=100, short_sizes=(800,),
      max_size=1333, photometric="strongv2")

  # Baseline: the same transform in a sequential loop, one image at a time.
  fn = transforms.make_train_transform(tcfg)
  n_base = min(args.images // 4, len(src))
  t0 = time.perf_counter()
  for i in range(n_base):
    fn(src[i % len(src)], np.random.default_rng(i))
  base_ips = n_base / (time.perf_counter() - t0)

  it = pipeline.TrainInput(src, tcfg, batch_size=args.batch_size, seed=0,
                           num_threads=args.threads, prefetch=2)
  for _ in range(2):  # warm-up: thread pool start, first decodes
    next(it)
  num_batches = max(1, args.images // args.batch_size)
  t0 = time.perf_counter()
  for _ in range(num_batches):
    b = next(it)
  dt = time.perf_counter() - t0
  ips = num_batches * args.batch_size / dt
  assert b["image"].shape == (args.batch_size, 1344, 1344, 3)

  result = {
      "benchmark": "input_pipeline",
      "dataset": f"coco:{args.root}:{args.split}",
      "resize": "short 800, max 1333, canvas 1344x1344, views: teacher + "
                "student (strongv2)",
      "threads": args.threads, "batch_size": args.batch_size,
      "cpu_count": os.cpu_count(), "machine": platform.processor() or
                                              platform.machine(),
      "images_per_s": round(ips, 2),
      "baseline_sequential_images_per_s": round(base_ips, 2),
      "ratio_vs_sequential": round(ips / base_ips, 3),
      "goal_images_per_s": 25.0,
      "meets_goal": bool(ips >= 25.0),
  }
  print(f"pipeline: {ips:.1f} img/s  sequential loop: {base_ips:.1f} img/s  "
        f"ratio {ips / base_ips:.2f}x  (goal >= 25 img/s: "
        f"{'met' if ips >= 25 else 'NOT met'})")
  os.makedirs(os.path.dirname(args.output), exist_ok=True)
  with open(args.output, "w") as f:
    json.dump(result, f, indent=2)
  print(f"wrote {args.output}")


if __name__ == "__main__":
  main()
