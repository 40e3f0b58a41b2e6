r"""`python -m boxseg_jax.maskcut`: MaskCut pseudo masks as COCO JSON.

  python -m boxseg_jax.maskcut --images='DIR/**/*.jpg' | coco:ROOT:SPLIT \
      --output=FILE.json --weights=dino_vitbase8_pretrain.pth \
      [--config=configs/maskcut.py[:variant]] [--config.batch_size=8] \
      [--limit=N] [--random-init]

Refuses to run without --weights unless --random-init is given (smoke tests).
Errors of ours (weights, config, image list) print one line and exit with
status 2; ``--traceback`` shows the full traceback (``boxseg_jax/cli.py``).
"""

import json
import pathlib

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from boxseg_jax import cli
from boxseg_jax.maskcut import generate
from boxseg_jax.maskcut import dataset_io

_DEFAULT_CONFIG = str(
    pathlib.Path(__file__).resolve().parents[2] / "configs" / "maskcut.py")

_CONFIG = config_flags.DEFINE_config_file(
    "config", _DEFAULT_CONFIG, "MaskCut config file (configs/maskcut.py).",
    lock_config=True)
_IMAGES = flags.DEFINE_string(
    "images", None, "A glob of image files, or coco:ROOT:SPLIT.")
_OUTPUT = flags.DEFINE_string("output", None, "COCO JSON file to write.")
_WEIGHTS = flags.DEFINE_string(
    "weights", None, "DINO ViT checkpoint (.pth, read without torch).")
_RANDOM_INIT = flags.DEFINE_bool(
    "random-init", False, "Allow random ViT weights (smoke tests only).")
_LIMIT = flags.DEFINE_integer(
    "limit", 0, "Process only the first N images (0: all).")
_NO_PROGRESS = flags.DEFINE_bool("no-progress", False, "Hide the progress bar.")
flags.mark_flags_as_required(["images", "output"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cfg = _CONFIG.value
  if cfg is None:
    raise app.UsageError("no config: pass --config=configs/maskcut.py")
  params = generate.load_params(cfg, _WEIGHTS.value, _RANDOM_INIT.value)
  entries = dataset_io.list_images(_IMAGES.value)
  if _LIMIT.value > 0:
    entries = entries[:_LIMIT.value]
  stats = generate.run(cfg, entries, params, _OUTPUT.value,
                       progress=not _NO_PROGRESS.value)
  summary = dict(stats, skipped=len(stats["skipped"]), output=_OUTPUT.value)
  logging.info("maskcut done: %s", json.dumps(summary))
  print(json.dumps(summary))
  for path, err in stats["skipped"]:
    print(f"skipped {path}: {err}")


if __name__ == "__main__":
  cli.run(main, "boxseg_jax.maskcut")
