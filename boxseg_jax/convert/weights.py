"""One entry point for every weight format, the ``.npz`` and the hints.

``convert_file(path, fmt)`` reads a file (no pickled code runs: every
reader goes through ``convert.safe_pickle``), maps it onto our parameter
tree and returns a ``Converted``: flat arrays, the ``config`` values the
weights need (``hints``) and the key report. ``save`` writes

* ``OUT.npz``: ``/``-joined parameter paths (``backbone/stem/conv1/kernel``)
  that ``config.init`` loads, plus ``batch_stats/...`` entries for the
  mask-branch BatchNorm statistics of full checkpoints;
* ``OUT.hints.json``: the config values (``model.input_format``,
  ``model.pixel_mean`` / ``pixel_std``, ``model.stride_in_1x1``, and for
  full checkpoints ``model.num_classes`` etc.), the matching
  ``--config.*`` flags, ``init_keys`` and the report.
"""

import dataclasses
import json
import os
from typing import Any, Dict, List, Optional

import ml_collections
import numpy as np

from boxseg_jax.convert import common
from boxseg_jax.convert import condinst as condinst_conv
from boxseg_jax.convert import resnet as resnet_conv
from boxseg_jax.convert import safe_pickle
from boxseg_jax.convert.common import ConversionError

FORMATS = ("torchvision", "msra", "d2", "adelaidet")
INPUT_FORMATS = ("RGB", "BGR")
FIRST_CONV = "params/backbone/stem/conv1/kernel"


@dataclasses.dataclass
class Converted:
  """A converted file: arrays, config hints, report."""
  arrays: Dict[str, np.ndarray]   # "params/..." and "batch_stats/..."
  hints: Dict[str, Any]           # flat config keys, e.g. "model.depth"
  report: common.Report
  fmt: str
  source: str
  network: Optional[str] = None   # teacher / student where a file has both
  notes: List[str] = dataclasses.field(default_factory=list)

  @property
  def init_keys(self) -> List[str]:
    return sorted({k.split("/")[1] for k in self.arrays
                   if k.startswith("params/")})


def read_weights(path: str) -> Any:
  """``.pkl`` through the numpy-only unpickler, else a torch file."""
  if path.endswith(".pkl"):
    return safe_pickle.read_numpy_pickle(path)
  return safe_pickle.read_torch_checkpoint(path)


def _arrays_only(sd: Any, source: str) -> Dict[str, np.ndarray]:
  if not isinstance(sd, dict):
    raise ConversionError(f"{source}: expected a dict of arrays, got "
                          f"{type(sd)}")
  return {k: v for k, v in sd.items() if isinstance(v, np.ndarray)}


def _backbone_state_dict(obj: Any, fmt: str, source: str):
  """(detectron2-named dict, ignored keys, native input format, author)."""
  author = None
  if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
    author = obj.get("__author__")
    obj = obj["model"]
  elif isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
    obj = obj["state_dict"]
  elif fmt == "msra" and isinstance(obj, dict) and isinstance(
      obj.get("blobs"), dict):
    obj = obj["blobs"]
  sd = _arrays_only(obj, source)
  if fmt == "torchvision":
    d2, ignored = resnet_conv.torchvision_to_d2(sd)
    return d2, ignored, "RGB", author
  if fmt == "msra":
    d2, ignored = resnet_conv.msra_to_d2(sd)
    return d2, ignored, "BGR", author
  d2 = common.strip_prefixes(sd, ("module.", "backbone.bottom_up.",
                                  "backbone."))
  # detectron2-format files say who wrote them; only Caffe2/MSRA weights are
  # BGR with std 1 and the stride in the 1x1 conv.
  native = "BGR" if str(author).lower() in ("caffe2", "msra") else "RGB"
  return d2, [], native, author


def _normalisation(native: str) -> Dict[str, Any]:
  if native == "BGR":
    return {"model.input_format": "BGR",
            "model.pixel_mean": resnet_conv.MSRA_MEAN_BGR,
            "model.pixel_std": resnet_conv.MSRA_STD_BGR,
            "model.stride_in_1x1": True}
  return {"model.input_format": "RGB",
          "model.pixel_mean": resnet_conv.IMAGENET_MEAN_RGB,
          "model.pixel_std": resnet_conv.IMAGENET_STD_RGB,
          "model.stride_in_1x1": False}


def _switch_input_format(conv: Converted, native: str,
                         wanted: Optional[str]) -> None:
  """Flips the first conv's input channels when the input format changes."""
  if not wanted or wanted == native:
    return
  if wanted not in INPUT_FORMATS:
    raise ValueError(f"--input_format must be one of {INPUT_FORMATS}, got "
                     f"{wanted!r}")
  conv.arrays[FIRST_CONV] = common.flip_input_channels(
      conv.arrays[FIRST_CONV])
  conv.hints["model.input_format"] = wanted
  conv.hints["model.pixel_mean"] = tuple(conv.hints["model.pixel_mean"][::-1])
  conv.hints["model.pixel_std"] = tuple(conv.hints["model.pixel_std"][::-1])
  conv.notes.append(f"first conv input channels reversed: the file expects "
                    f"{native} images, the hints say {wanted}")


def convert_file(path: str, fmt: str, *, input_format: Optional[str] = None,
                 checkpoint_key: str = "teacher",
                 allow_unexpected: bool = False) -> Converted:
  """Reads and converts one weight file.

  Args:
    path: the file (``.pth``/``.pt`` torch, ``.pkl`` numpy pickle).
    fmt: one of ``FORMATS``.
    input_format: "RGB" / "BGR" to convert the first conv to that input
      channel order; None keeps the file's own.
    checkpoint_key: "teacher" or "student" for files holding both.
    allow_unexpected: report unknown keys instead of failing.

  Raises:
    ConversionError: naming missing / unexpected / mis-shaped keys.
  """
  if fmt not in FORMATS:
    raise ValueError(f"--format must be one of {FORMATS}, got {fmt!r}")
  return convert_object(read_weights(path), fmt, path,
                        input_format=input_format,
                        checkpoint_key=checkpoint_key,
                        allow_unexpected=allow_unexpected)


def convert_object(obj: Any, fmt: str, path: str, *,
                   input_format: Optional[str] = None,
                   checkpoint_key: str = "teacher",
                   allow_unexpected: bool = False) -> Converted:
  """``convert_file`` on an already-read object (``path`` names it)."""
  if fmt not in FORMATS:
    raise ValueError(f"--format must be one of {FORMATS}, got {fmt!r}")
  if fmt == "adelaidet":
    arrays, arch, report, net = condinst_conv.convert_condinst(
        obj, path, checkpoint_key=checkpoint_key,
        allow_unexpected=allow_unexpected)
    native = "BGR"  # AdelaiDet / BoxTeacher train from MSRA weights
    hints = {f"model.{k}": v for k, v in arch.items()}
    hints["model.resnet_num_blocks"] = tuple(arch["resnet_num_blocks"] or ())
    hints.update(_normalisation(native))
    hints["model.backbone_norm"] = "FrozenBN"
    conv = Converted(arrays, hints, report, fmt, path, network=net)
    conv.notes.append("AdelaiDet / BoxTeacher models are trained from MSRA "
                      "weights: BGR input, std 1, stride in the 1x1 conv")
  else:
    d2, ignored, native, author = _backbone_state_dict(obj, fmt, path)
    out = common.Collector(path)
    for k in ignored:
      out.ignore(k)
    rename = {"torchvision": resnet_conv.d2_to_torchvision_name,
              "msra": resnet_conv.d2_to_msra_name}.get(fmt)
    arrays, arch = resnet_conv.finish_backbone(
        d2, out, fill_stats=fmt == "msra",
        allow_unexpected=allow_unexpected, rename=rename)
    hints = {"model.depth": arch["depth"],
             "model.resnet_num_blocks": tuple(arch["num_blocks"] or ()),
             "model.resnet_width": arch["width"],
             "model.backbone_norm": "FrozenBN"}
    hints.update(_normalisation(native))
    conv = Converted(arrays, hints, out.report, fmt, path)
    if fmt == "d2":
      conv.notes.append(
          f"detectron2-format file written by {author!r}: input format "
          f"{native} assumed (BGR / stride in 1x1 only for Caffe2/MSRA "
          "weights); check the model's README")
  _switch_input_format(conv, native, input_format)
  return conv


def npz_arrays(conv: Converted) -> Dict[str, np.ndarray]:
  """Keys as ``config.init`` reads them (``params/`` prefix dropped)."""
  return {(k[len("params/"):] if k.startswith("params/") else k): v
          for k, v in conv.arrays.items()}


def hints_path(output: str) -> str:
  base = output[:-len(".npz")] if output.endswith(".npz") else output
  return base + ".hints.json"


def _flag_value(v: Any) -> str:
  if isinstance(v, (tuple, list)):
    return "(" + ",".join(str(x) for x in v) + ("," if len(v) == 1 else "") \
        + ")"
  return str(v)


def hints_json(conv: Converted, output: str) -> Dict[str, Any]:
  config = {k: (list(v) if isinstance(v, tuple) else v)
            for k, v in conv.hints.items()}
  keys = conv.init_keys
  flags = [f"--config.{k}={_flag_value(v)}" for k, v in conv.hints.items()]
  flags += [f"--config.init={os.path.abspath(output)}",
            f"--config.init_keys={_flag_value(tuple(keys))}"]
  return {"format": conv.fmt, "input": os.path.abspath(conv.source),
          "network": conv.network, "weights": os.path.abspath(output),
          "config": config, "init_keys": keys, "flags": flags,
          "notes": conv.notes, "report": conv.report.to_json()}


def save(conv: Converted, output: str) -> Dict[str, Any]:
  """Writes ``output`` (.npz) and the hints JSON beside it; returns hints."""
  if not output.endswith(".npz"):
    raise ValueError(f"--output must end in .npz, got {output!r}")
  os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
  tmp = output[:-len(".npz")] + ".tmp.npz"
  np.savez(tmp, **npz_arrays(conv))
  os.replace(tmp, output)
  payload = hints_json(conv, output)
  with open(hints_path(output), "w") as f:
    json.dump(payload, f, indent=2)
  return payload


def read_hints(weights: str) -> Optional[Dict[str, Any]]:
  """The hints JSON beside a converted ``.npz`` (None if absent)."""
  path = hints_path(weights)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def apply_hints(config: ml_collections.ConfigDict, hints: Dict[str, Any]
                ) -> List[str]:
  """Sets the hinted ``config`` values; returns "key: old -> new" lines."""
  changed = []
  for key, value in hints.get("config", {}).items():
    node = config
    *path, leaf = key.split(".")
    for p in path:
      node = node[p]
    old = node[leaf]
    if isinstance(old, tuple):
      value = tuple(value)
    if old != value:
      node[leaf] = value
      changed.append(f"{key}: {old!r} -> {value!r}")
  return changed
