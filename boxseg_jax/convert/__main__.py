r"""Converts published weights to an ``.npz`` that ``config.init`` loads.

  python -m boxseg_jax.convert --input=R-50.pkl --format=msra \
      --output=weights/msra_r50.npz
  python -m boxseg_jax.convert --input=resnet50-0676ba61.pth \
      --format=torchvision --output=weights/tv_r50.npz
  python -m boxseg_jax.convert --input=BoxInst_MS_R_50_1x.pth \
      --format=adelaidet --output=weights/boxinst_r50_1x.npz

Prints the key report and the ``--config.*`` flags the weights need, and
writes them beside the output as ``OUT.hints.json`` (docs/weights.md).
No pickled code in the input runs (``convert.safe_pickle``).
"""

import json
import sys

from absl import app
from absl import flags

from boxseg_jax.convert import weights

_INPUT = flags.DEFINE_string("input", None, "Weight file to read.")
_FORMAT = flags.DEFINE_enum("format", None, list(weights.FORMATS),
                            "Layout of --input.")
_OUTPUT = flags.DEFINE_string("output", None, "Output .npz.")
_INPUT_FORMAT = flags.DEFINE_enum(
    "input_format", None, list(weights.INPUT_FORMATS),
    "Convert the first conv to this image channel order (default: keep the "
    "file's own; RGB for torchvision / d2, BGR for MSRA / AdelaiDet).")
_CHECKPOINT_KEY = flags.DEFINE_enum(
    "checkpoint_key", "teacher", ["teacher", "student"],
    "Network of a file that holds both (BoxTeacher).")
_ALLOW_UNEXPECTED = flags.DEFINE_bool(
    "allow_unexpected", False,
    "List unknown keys instead of failing on them.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError("Too many command-line arguments.")
  try:
    conv = weights.convert_file(
        _INPUT.value, _FORMAT.value, input_format=_INPUT_FORMAT.value,
        checkpoint_key=_CHECKPOINT_KEY.value,
        allow_unexpected=_ALLOW_UNEXPECTED.value)
  except (weights.ConversionError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  hints = weights.save(conv, _OUTPUT.value)
  print(f"{conv.source} ({conv.fmt}"
        f"{', ' + conv.network if conv.network else ''}): "
        f"{conv.report.summary()}")
  for note in conv.notes:
    print(f"note: {note}")
  print(f"wrote {_OUTPUT.value} (subtrees {', '.join(conv.init_keys)}) and "
        f"{weights.hints_path(_OUTPUT.value)}")
  print("config hints:\n  " + "\n  ".join(hints["flags"]))
  print(json.dumps(hints["config"]))


if __name__ == "__main__":
  flags.mark_flags_as_required(["input", "format", "output"])
  app.run(main)
