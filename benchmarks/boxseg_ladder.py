r"""The BoxSeg ablation ladders (paper Tables 4, 5, 7, the code's QAM).

Trains every `--variants` row of `config.BOXSEG_VARIANTS` (Table 4, QAM
alone: no_pseudo, bpma, bqr, bqr_qmf, bqr_qmf_mqs = no_pc; Table 7:
fixed_k; Table 5, QAM + Peer-assisted Copy-paste: pc_random,
pc_hq_random_place, full = pc_hq_overlap; qam_code) with every seed
of `--seeds`, on one of two data sets, and prints one table: segm AP, the
two box-fill baselines (the same detections with boxes filled as masks:
what the masks must beat), bbox AP and the pseudo masks' mean IoU with the
GT masks at the end of training (over the GTs that have a pseudo mask, and
over all GTs: a method that gives fewer GTs a pseudo mask can have the
higher first and the lower second), per run, averaged over seeds, and
their spread (max - min) over seeds.

* `--data=shapes`: configs/demo.py:VARIANT, the BoxSeg demo (about 33
  minutes per run on 2 CPU cores, measured; 10 variants x 1 seed: ~5.5 h);
* `--data=coco_mini`: benchmarks/overfit_coco_mini.py's 16 photos with
  `boxseg:VARIANT` (`--steps`, default 600).

Every row keeps BoxSeg's other settings (varifocal loss, teacher
inference, schedule, seed), so only the pseudo labels and PC differ.

  python benchmarks/boxseg_ladder.py --data=shapes --seeds=0
  python benchmarks/boxseg_ladder.py --data=coco_mini --seeds=0,1,2

Writes JSON to benchmarks/results/boxseg_ladder_<data>.json after every
run; runs already there are skipped (`--fresh` starts over), so a ladder
can be split over several sittings.
"""

import argparse
import importlib.util
import json
import os
import pathlib
import shutil
import statistics
import time

from boxseg_jax import config as config_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_VARIANTS = ("no_pseudo", "bpma", "bqr", "bqr_qmf", "bqr_qmf_mqs",
                    "fixed_k", "pc_random", "pc_hq_random_place", "full",
                    "qam_code")
COLUMNS = ("segm", "segm_boxfill", "segm_boxfill_grid", "bbox")


def _load(path, name):
  spec = importlib.util.spec_from_file_location(name, path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def _todo(variants, seeds, results):
  """(variant, seed, key) of the runs not in `results` yet."""
  for variant in variants:
    for seed in seeds:
      key = f"{variant}/seed{seed}"
      if key in results:
        print(f"{key}: in the results file already, skipped")
      else:
        yield variant, seed, key


def run_shapes(variants, seeds, workdir, results, save):
  """Trains configs/demo.py:VARIANT for every variant and seed.

  Runs already in `results` are skipped; `save(results)` is called after
  each run, so an interrupted ladder keeps what it finished.
  """
  from boxseg_jax.train import loop  # pylint: disable=g-import-not-at-top
  demo = _load(REPO / "configs" / "demo.py", "demo")
  overfit = _load(REPO / "benchmarks" / "overfit_coco_mini.py", "overfit")
  for variant, seed, key in _todo(variants, seeds, results):
    wd = os.path.join(workdir, f"{variant}_seed{seed}")
    if os.path.exists(wd):
      shutil.rmtree(wd)
    config = demo.get_config(variant)
    config.seed = seed
    config.train.panel_every_steps = 0   # pictures do not change training
    t0 = time.time()
    summary = loop.train_and_evaluate(config, wd)
    results[key] = {"method": f"boxseg:{variant}", "seed": seed,
                    "eval": summary["eval"],
                    **overfit.pseudo_traces(summary["history"]),
                    "seconds": round(time.time() - t0, 1)}
    save(results)
  return results


def run_coco_mini(variants, seeds, args, results, save):
  """benchmarks/overfit_coco_mini.py's run of `boxseg:VARIANT`, one
  variant and seed at a time (skipping those in `results`, saving after
  each)."""
  overfit = _load(REPO / "benchmarks" / "overfit_coco_mini.py", "overfit")
  ns = argparse.Namespace(root=args.root, steps=args.steps,
                          canvas=args.canvas, num_images=args.num_images,
                          workdir=args.workdir)
  for variant, seed, key in _todo(variants, seeds, results):
    raw = overfit.run([f"boxseg:{variant}"], [seed], ns, args.set)
    results[key] = next(iter(raw.values()))
    save(results)
  return results


def _last(r, name):
  trace = r.get(name) or []
  return trace[-1][1] if trace else float("nan")


def _cells(r):
  """A row's APs, its pseudo masks' IoU at the end of training (over the
  GTs that have one) and their coverage-weighted IoU (over all GTs: IoU x
  fraction; nan for runs saved before the fraction was recorded)."""
  ev = r["eval"]
  vals = [ev[c]["AP"] if c in ev else float("nan") for c in COLUMNS]
  iou = _last(r, "pseudo_iou")
  return vals + [iou, iou * _last(r, "pseudo_fraction")]


def print_table(results, variants):
  head = "".join(f"{c:>19}" for c in COLUMNS + ("pseudo_iou",
                                                "pseudo_iou_all_gts"))
  print(f"{'variant/seed':<26}{head}")
  for key, r in results.items():
    print(f"{key:<26}" + "".join(f"{v:19.3f}" for v in _cells(r)))
  print("mean over seeds")
  for variant in variants:
    rows = [_cells(r) for k, r in results.items()
            if k.split("/")[0] == variant]
    if rows:
      means = [statistics.fmean(col) for col in zip(*rows)]
      print(f"{variant:<26}" + "".join(f"{v:19.3f}" for v in means))
  print("spread over seeds (max - min; variants with 2 or more seeds)")
  for variant in variants:
    rows = [_cells(r) for k, r in results.items()
            if k.split("/")[0] == variant]
    if len(rows) > 1:
      spread = [max(col) - min(col) for col in zip(*rows)]
      print(f"{variant:<26}" + "".join(f"{v:19.3f}" for v in spread))


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--data", default="shapes", choices=("shapes", "coco_mini"))
  p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS))
  p.add_argument("--seeds", default="0")
  p.add_argument("--workdir", default="/tmp/boxseg_ladder")
  p.add_argument("--root", default=str(REPO.parent / "shared" / "data" /
                                       "coco-mini"))
  p.add_argument("--steps", type=int, default=600)
  p.add_argument("--canvas", type=int, default=256)
  p.add_argument("--num_images", type=int, default=16)
  p.add_argument("--set", action="append", default=[],
                 help="coco_mini: config override key=value (repeatable)")
  p.add_argument("--output", default="")
  p.add_argument("--fresh", action="store_true",
                 help="ignore runs already in the output file")
  args = p.parse_args()
  variants = args.variants.split(",")
  for v in variants:
    if v not in config_lib.BOXSEG_VARIANTS:
      p.error(f"--variants: {v!r} not in {sorted(config_lib.BOXSEG_VARIANTS)}")
  seeds = [int(x) for x in args.seeds.split(",")]
  args.workdir = os.path.join(args.workdir, args.data)
  out = pathlib.Path(args.output or REPO / "benchmarks" / "results" /
                     f"boxseg_ladder_{args.data}.json")
  results = {}
  if out.exists() and not args.fresh:
    results = json.loads(out.read_text())["runs"]

  def save(runs):
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(
        {"benchmark": "boxseg_ladder", "data": args.data,
         "variants": sorted({k.split("/")[0] for k in runs}),
         "seeds": sorted({r["seed"] for r in runs.values()}),
         "host_cpus": os.cpu_count(), "runs": runs}, indent=2))
    os.replace(tmp, out)

  if args.data == "shapes":
    results = run_shapes(variants, seeds, args.workdir, results, save)
  else:
    results = run_coco_mini(variants, seeds, args, results, save)
  print_table(results, variants)
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
