r"""Box supervision vs mask supervision on 16 real COCO photos.

Trains a small CondInst from scratch on the first 16 photos of coco-mini
train2017 twice with the same budget: (a) BoxInst, boxes only; (b) dice on
the GT masks. Both are evaluated (segm and bbox AP) on the *same* 16 photos
against their GT masks, which (a) never saw. Prints both and the ratio
box/mask, writes JSON.

  python benchmarks/overfit_coco_mini.py [--steps=600] [--canvas=256]
"""

import argparse
import importlib.util
import json
import os
import pathlib
import time

REPO = pathlib.Path(__file__).resolve().parents[1]


def make_config(method, root, steps, canvas, num_images):
  spec = importlib.util.spec_from_file_location(
      "demo", REPO / "configs" / "demo.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config()
  c.method = method
  c.data.with_masks = method == "mask"
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
  return c


def main():
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--root", default=str(REPO.parent / "shared" / "data" /
                                       "coco-mini"))
  p.add_argument("--steps", type=int, default=600)
  p.add_argument("--canvas", type=int, default=256)
  p.add_argument("--num_images", type=int, default=16)
  p.add_argument("--workdir", default="/tmp/boxseg_overfit_coco_mini")
  p.add_argument("--output", default=str(REPO / "benchmarks" / "results" /
                                         "overfit_coco_mini.json"))
  args = p.parse_args()
  from boxseg_jax.train import loop  # pylint: disable=g-import-not-at-top

  results = {}
  for method in ("boxinst", "mask"):
    workdir = os.path.join(args.workdir, method)
    if os.path.exists(workdir):
      import shutil  # pylint: disable=g-import-not-at-top
      shutil.rmtree(workdir)
    t0 = time.time()
    summary = loop.train_and_evaluate(
        make_config(method, args.root, args.steps, args.canvas,
                    args.num_images), workdir)
    results[method] = {"eval": summary["eval"],
                       "seconds": round(time.time() - t0, 1)}
  box, mask = results["boxinst"]["eval"], results["mask"]["eval"]
  ratio = box["segm"]["AP"] / max(mask["segm"]["AP"], 1e-9)
  out = {"benchmark": "overfit_coco_mini", "photos": args.num_images,
         "steps": args.steps, "canvas": args.canvas, **results,
         "segm_AP_ratio_box_over_mask": round(ratio, 3)}
  print(f"boxes only : segm AP {box['segm']['AP']:.2f}  bbox AP "
        f"{box['bbox']['AP']:.2f}")
  print(f"GT masks   : segm AP {mask['segm']['AP']:.2f}  bbox AP "
        f"{mask['bbox']['AP']:.2f}")
  print(f"ratio (segm AP, boxes / masks): {ratio:.3f}")
  os.makedirs(os.path.dirname(args.output), exist_ok=True)
  with open(args.output, "w") as f:
    json.dump(out, f, indent=2)
  print(f"wrote {args.output}")


if __name__ == "__main__":
  main()
