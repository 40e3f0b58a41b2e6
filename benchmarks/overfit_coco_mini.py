r"""Box supervision vs mask supervision on 16 real COCO photos.

Trains a small CondInst from scratch on the first 16 photos of coco-mini
train2017 with the same budget for each method of `--methods` (default:
BoxInst and BoxTeacher, boxes only, and dice on the GT masks). Each is
evaluated on the *same* 16 photos against their GT masks, which the
box-supervised runs never saw: segm AP next to the two box-fill baselines
(the same detections with each box filled as its mask, crisp and on the
stride-4 grid) and bbox AP. The teacher-student methods also log the mean
IoU of their pseudo masks with the GT masks over training. Prints the
table, writes JSON.

A method is `boxinst`, `mask`, `boxteacher`, `boxseg` (the paper's QAM)
or `boxseg:VARIANT`, a row of the BoxSeg ablation ladder
(`config.BOXSEG_VARIANTS`: no_pseudo, bpma, bqr, bqr_qmf, bqr_qmf_mqs =
no_pc, fixed_k, pc_random, pc_hq_random_place, full = pc_hq_overlap,
qam_code), which keeps every BoxSeg setting (varifocal loss, teacher
inference) and changes only the pseudo labels and Peer-assisted
Copy-paste. `--seeds=0,1,2`
repeats each method with those seeds.

  python benchmarks/overfit_coco_mini.py [--steps=600] [--canvas=256] \
      [--methods=boxinst,boxteacher,mask] [--seeds=0] \
      [--set loss.pairwise_warmup_iters=60]
  python benchmarks/overfit_coco_mini.py \
      --methods=boxseg:no_pseudo,boxseg:bpma,boxseg:bqr,boxseg:bqr_qmf,boxseg
"""

import argparse
import importlib.util
import json
import os
import pathlib
import shutil
import time

from boxseg_jax import config as config_lib
from boxseg_jax import config_helpers

REPO = pathlib.Path(__file__).resolve().parents[1]


def _parse_value(text):
  try:
    return json.loads(text)
  except json.JSONDecodeError:
    return text


def apply_overrides(c, overrides):
  """``key=value`` strings (JSON values; lists become tuples)."""
  parsed = {}
  for item in overrides:
    key, _, value = item.partition("=")
    v = _parse_value(value)
    parsed[key] = tuple(v) if isinstance(v, list) else v
  config_helpers.apply_overrides(c, parsed)


def _load_config(name):
  spec = importlib.util.spec_from_file_location(
      name, REPO / "configs" / f"{name}.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config()


def make_config(method, root, steps, canvas, num_images):
  """The config of one method spec (`NAME` or `boxseg:VARIANT`)."""
  name, _, variant = method.partition(":")
  # The BoxInst demo's model and optimizer; the data are the photos.
  c = _load_config("demo_boxinst")
  c.method = name
  c.data.with_masks = name == "mask"
  c.data.train = f"coco:{root}:train2017"
  c.data.val = f"coco:{root}:train2017"
  c.data.num_train_images = num_images
  c.eval.num_images = num_images
  c.data.canvas = (canvas, canvas)
  c.data.train_short_sizes = (canvas * 3 // 4, canvas)
  c.data.train_max_size = canvas
  c.data.test_short_size = canvas
  c.data.test_max_size = canvas
  c.data.max_instances = 50
  c.model.num_classes = 80
  c.loss.bottom_pixels_removed = 10
  # COCO photos have many positives: the reference's 64 slots per image.
  c.loss.mask_slots_per_image = 0
  # The pairwise term reaches full weight after a tenth of the run (the
  # reference: 10k of 90k iterations).
  c.loss.pairwise_warmup_iters = max(steps // 10, 1)
  c.train.num_steps = steps
  c.train.eval_every_steps = 0
  c.train.log_every_steps = 50
  c.optim.lr_boundaries = (int(steps * 0.8), int(steps * 0.93))
  c.ckpt.every_steps = steps
  if name in ("boxteacher", "boxseg"):
    c.teacher.view = "same"  # train and test scale coincide here
    c.boxteacher.warmup_iters = max(steps // 9, 1)  # the paper's 10k of 90k
    c.teacher.momentum = config_lib.scaled_ema_momentum(steps)
    c.train.monitor_pseudo_labels = True
    c.eval.use_teacher = True
    c.eval.rescore = True
  if name == "boxseg":
    config_lib.use_boxseg(c)
    # PC's schedule and pixel thresholds scaled like the rest: the paper's
    # 10k of 90k steps of ramp; areas and shifts from the ~800-px COCO
    # scale to this canvas.
    c.pc.ramp_steps = max(steps // 9, 1)
    scale = canvas / 800.0
    c.pc.min_area = 300.0 * scale ** 2
    c.pc.box_shift_thresh = 10.0 * scale
    if variant:
      config_lib.use_boxseg_variant(c, variant)
  elif variant:
    raise ValueError(f"{method!r}: only boxseg has variants")
  return c


def _row(name, ev, pseudo_iou=None):
  cells = [ev[t]["AP"] for t in ("segm", "segm_boxfill_grid",
                                 "segm_boxfill", "bbox") if t in ev]
  ap75 = [ev[t]["AP75"] for t in ("segm", "segm_boxfill_grid") if t in ev]
  tail = "" if pseudo_iou is None else f"   pseudo IoU {pseudo_iou:.3f}"
  return (f"{name:<22}" + "".join(f"{v:9.2f}" for v in cells) +
          "   AP75 " + " / ".join(f"{v:.2f}" for v in ap75) + tail)


def run(methods, seeds, args, overrides):
  """Trains and evaluates every (method, seed); returns results by key."""
  from boxseg_jax.train import loop  # pylint: disable=g-import-not-at-top
  results = {}
  for method in methods:
    for seed in seeds:
      key = method if len(seeds) == 1 else f"{method}/seed{seed}"
      workdir = os.path.join(args.workdir,
                             key.replace(":", "_").replace("/", "_"))
      if os.path.exists(workdir):
        shutil.rmtree(workdir)
      config = make_config(method, args.root, args.steps, args.canvas,
                           args.num_images)
      config.seed = seed
      apply_overrides(config, overrides)
      t0 = time.time()
      summary = loop.train_and_evaluate(config, workdir)
      results[key] = {"method": method, "seed": seed,
                      "eval": summary["eval"],
                      "seconds": round(time.time() - t0, 1)}
      results[key].update(pseudo_traces(summary["history"]))
  return results


# The pseudo-label monitors (`methods.boxteacher.pseudo_label_metrics`)
# kept per run: mean IoU with the GT masks over the GTs that have a pseudo
# mask, the fraction of GTs that have one, and their mean flag. IoU alone
# compares different subsets of GTs across methods; fraction x IoU is the
# mean IoU over all GTs (0 for a GT without a pseudo mask).
PSEUDO_TRACES = ("pseudo_iou", "pseudo_fraction", "pseudo_flag_mean")


def pseudo_traces(history):
  """{monitor: [(step, value), ...]} of `PSEUDO_TRACES` in a training
  history (`loop.train_and_evaluate`'s `summary["history"]`); monitors a
  run does not log are left out."""
  out = {}
  for name in PSEUDO_TRACES:
    trace = [(step, m[name]) for step, m in history if name in m]
    if trace:
      out[name] = trace
  return out


def print_table(results):
  print(f"{'method':<22}    segm  boxfill_grid  boxfill    bbox")
  for key, r in results.items():
    last = r["pseudo_iou"][-1][1] if r.get("pseudo_iou") else None
    print(_row(key, r["eval"], last) + f"   ({r['seconds']:.0f} s)")


def main():
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--root", default=str(REPO.parent / "shared" / "data" /
                                       "coco-mini"))
  p.add_argument("--steps", type=int, default=600)
  p.add_argument("--canvas", type=int, default=256)
  p.add_argument("--num_images", type=int, default=16)
  p.add_argument("--workdir", default="/tmp/boxseg_overfit_coco_mini")
  p.add_argument("--methods", default="boxinst,boxteacher,mask")
  p.add_argument("--seeds", default="0")
  p.add_argument("--set", action="append", default=[],
                 help="config override key=value (repeatable)")
  p.add_argument("--output", default=str(REPO / "benchmarks" / "results" /
                                         "overfit_coco_mini.json"))
  args = p.parse_args()
  seeds = [int(x) for x in args.seeds.split(",")]
  results = run(args.methods.split(","), seeds, args, args.set)
  out = {"benchmark": "overfit_coco_mini", "photos": args.num_images,
         "steps": args.steps, "canvas": args.canvas, "overrides": args.set,
         "seeds": seeds, **results}
  print_table(results)
  for key, r in results.items():
    if "pseudo_iou" in r:
      print(f"  {key} pseudo-mask IoU over training: " + ", ".join(
          f"{s}: {v:.3f}" for s, v in r["pseudo_iou"][::4]))
  if "mask" in results and "boxinst" in results:
    box, mask = results["boxinst"]["eval"], results["mask"]["eval"]
    ratio = box["segm"]["AP"] / max(mask["segm"]["AP"], 1e-9)
    out["segm_AP_ratio_box_over_mask"] = round(ratio, 3)
    print(f"ratio (segm AP, BoxInst / masks): {ratio:.3f}")
  os.makedirs(os.path.dirname(args.output), exist_ok=True)
  with open(args.output, "w") as f:
    json.dump(out, f, indent=2)
  print(f"wrote {args.output}")


if __name__ == "__main__":
  main()
