r"""Pseudo-label assignments compared on one teacher.

The ladders (benchmarks/boxseg_ladder.py) train each row with its own
teacher, so a row's pseudo-mask IoU mixes two things: how good its teacher
became and how its assignment turns the teacher's outputs into pseudo
masks. This script restores one trained run (`--workdir`, made with
`--config`) and runs the pseudo-label function of every `--variants` row of
`config.BOXSEG_VARIANTS` (`VARIANT+key=value+...`: a row with overrides)
on the *same* teacher and the same training batches, and prints per row:
the fraction of GTs that get a pseudo mask, their mean flag (the loss
weight), their mean IoU with the GT masks, and the IoU over all GTs (0 for
a GT without a pseudo mask).

  python benchmarks/pseudo_label_audit.py --config=configs/demo.py:bpma \
      --workdir=/tmp/ladder/shapes/bpma_seed0 --batches=8

The probes vary one QAM filter at a time (`qam.tau=0`: no box-score
threshold; `qam.class_agnostic=True`; `qam.min_iou=0.3`;
`qam.class_filter=after_cut`: the code's class filter after the top-K
cut, with adaptive K and with the code's K = 20), to show which
filter decides how many GTs get a pseudo mask. Writes JSON to
benchmarks/results/pseudo_label_audit.json (`--output`).
"""

import argparse
import json
import os
import pathlib
import sys

import jax
import numpy as np

from boxseg_jax import config as config_lib
from boxseg_jax import config_helpers
from boxseg_jax.train import loop
from boxseg_jax.train import step as step_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_VARIANTS = ("bpma", "bqr", "bqr_qmf", "bqr_qmf_mqs")
DEFAULT_PROBES = ("bqr_qmf_mqs+qam.tau=0",
                  "bqr_qmf_mqs+qam.class_agnostic=True",
                  "bqr_qmf_mqs+qam.min_iou=0.3",
                  "bqr_qmf_mqs+qam.class_filter=after_cut",
                  "fixed_k+qam.class_filter=after_cut")
MONITORS = ("pseudo_fraction", "pseudo_flag_mean", "pseudo_iou")


def load_config(spec: str):
  """`path.py[:arg]` -> ConfigDict (as ml_collections' config_flags)."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  path, _, arg = spec.partition(":")
  mod_spec = importlib.util.spec_from_file_location("audit_config", path)
  mod = importlib.util.module_from_spec(mod_spec)
  mod_spec.loader.exec_module(mod)
  return mod.get_config(arg or None)


def row_config(base, row: str):
  """`VARIANT[+key=value...]` applied to a copy of `base` (a BoxSeg config
  with no variant applied: the variants are overrides of `full`)."""
  variant, *overrides = row.split("+")
  if variant not in config_lib.BOXSEG_VARIANTS:
    raise ValueError(f"{row!r}: {variant!r} is not in "
                     f"{sorted(config_lib.BOXSEG_VARIANTS)}")
  c = base.copy_and_resolve_references()
  config_lib.use_boxseg_variant(c, variant)
  parsed = {}
  for item in overrides:
    key, _, value = item.partition("=")
    old = c
    for part in key.split("."):
      old = old[part]
    # Typed as the field it replaces (`True`/`False` for booleans).
    parsed[key] = (value == "True") if isinstance(old, bool) else type(old)(
        value)
  return config_helpers.apply_overrides(c, parsed)


def audit(config, base, workdir: str, rows, num_batches: int) -> dict:
  """{row: {monitor: mean over batches}} on `workdir`'s newest teacher
  (`config`: the run's; `base`: the config the rows are variants of)."""
  config_lib.validate(config)
  model, mesh, state = loop.restore_latest(config, workdir)
  _, batches = loop.make_train_input(config)
  _, sharding = step_lib.shardings(mesh)
  data = [loop.global_batch(next(batches), sharding)
          for _ in range(num_batches)]
  out = {"step": int(jax.device_get(state.step))}
  for row in rows:
    fn = jax.jit(step_lib.make_pseudo_label_fn(model, row_config(base, row)))
    sums = {m: [] for m in MONITORS}
    for batch in data:
      _, metrics, _ = fn(state.ema_params, state.ema_batch_stats, batch)
      for m in MONITORS:
        sums[m].append(float(metrics[m]))
    res = {m: float(np.mean(v)) for m, v in sums.items()}
    res["pseudo_iou_all_gts"] = res["pseudo_iou"] * res["pseudo_fraction"]
    out[row] = res
    print(f"{row:<40}" + "".join(f"{res[m]:>12.3f}" for m in
                                  MONITORS + ("pseudo_iou_all_gts",)),
          flush=True)
  return out


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--config", required=True,
                 help="the trained run's config, path.py[:arg]")
  p.add_argument("--workdir", required=True)
  p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS +
                                                DEFAULT_PROBES))
  p.add_argument("--batches", type=int, default=8)
  p.add_argument("--output", default=str(REPO / "benchmarks" / "results" /
                                         "pseudo_label_audit.json"))
  args = p.parse_args()
  config = load_config(args.config)
  base = load_config(args.config.partition(":")[0])
  print(f"{'row':<40}" + "".join(f"{m:>12}" for m in
                                  ("fraction", "flag", "iou", "iou_all")))
  result = audit(config, base, args.workdir, args.variants.split(","),
                 args.batches)
  result.update(config=args.config, workdir=os.path.basename(
      os.path.normpath(args.workdir)), batches=args.batches)
  out = pathlib.Path(args.output)
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = out.with_suffix(".tmp")
  tmp.write_text(json.dumps(result, indent=2))
  os.replace(tmp, out)
  print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
