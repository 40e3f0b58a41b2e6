"""Layout helpers and the key report shared by every weight reader.

A reader maps each source key to ``(our_path, array)`` (or marks it as
deliberately ignored); ``finish`` then compares the result with the shapes
of the Flax model the weights are meant for and raises ``ConversionError``
naming every missing, unexpected and mis-shaped key.

Our paths are ``/``-joined and start with the collection: ``params/...`` or
``batch_stats/...`` (the ``.npz`` written by ``convert`` drops the
``params/`` prefix, which is what ``config.init`` reads).
"""

import dataclasses
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import jax
import numpy as np
from flax import traverse_util

from boxseg_jax.convert.safe_pickle import CheckpointError

Shape = Tuple[int, ...]


class ConversionError(CheckpointError):
  """A weight file whose keys or shapes do not fit the target model."""


def conv_kernel(w: np.ndarray, name: str = "") -> np.ndarray:
  """PyTorch conv weight ``[O, I, kh, kw]`` -> Flax ``[kh, kw, I, O]``."""
  w = np.asarray(w)
  if w.ndim != 4:
    raise ConversionError(f"{name}: conv weight must be 4-D (OIHW), got "
                          f"shape {w.shape}")
  return np.ascontiguousarray(w.transpose(2, 3, 1, 0))


def linear_kernel(w: np.ndarray, name: str = "") -> np.ndarray:
  """PyTorch linear weight ``[out, in]`` -> Flax ``[in, out]``."""
  w = np.asarray(w)
  if w.ndim != 2:
    raise ConversionError(f"{name}: linear weight must be 2-D, got "
                          f"shape {w.shape}")
  return np.ascontiguousarray(w.T)


def flip_input_channels(kernel: np.ndarray) -> np.ndarray:
  """Reverses the input-channel axis of an HWIO kernel (BGR <-> RGB).

  A first conv trained on BGR images applied to RGB images with its input
  channels reversed computes exactly the same function.
  """
  if kernel.ndim != 4 or kernel.shape[2] != 3:
    raise ConversionError(f"first conv kernel must be [kh, kw, 3, O], got "
                          f"{kernel.shape}")
  return np.ascontiguousarray(kernel[:, :, ::-1, :])


def flat_shapes(variables: Mapping[str, Any]) -> Dict[str, Shape]:
  """``{collection: tree}`` (e.g. ``jax.eval_shape`` of ``init``) ->
  ``{"collection/a/b": shape}``."""
  out = {}
  for col, tree in variables.items():
    for path, leaf in traverse_util.flatten_dict(dict(tree)).items():
      out["/".join((col,) + path)] = tuple(leaf.shape)
  return out


def model_shapes(module, height: int = 64, width: int = 64,
                 **call_kwargs) -> Dict[str, Shape]:
  """Flat variable shapes of a Flax module on a ``[1, H, W, 3]`` input."""
  variables = jax.eval_shape(
      lambda: module.init(jax.random.PRNGKey(0),
                          np.zeros((1, height, width, 3), np.float32),
                          **call_kwargs))
  return flat_shapes(variables)


@dataclasses.dataclass
class Report:
  """What a reader did with each key (names only, no arrays)."""
  source: str
  loaded: List[str] = dataclasses.field(default_factory=list)
  ignored: List[str] = dataclasses.field(default_factory=list)
  synthesized: List[str] = dataclasses.field(default_factory=list)
  unexpected: List[str] = dataclasses.field(default_factory=list)
  missing: List[str] = dataclasses.field(default_factory=list)
  mis_shaped: List[Tuple[str, str, Shape, Shape]] = dataclasses.field(
      default_factory=list)

  def problems(self, allow_unexpected: bool = False) -> List[str]:
    lines = []
    if self.missing:
      lines.append(f"{len(self.missing)} missing key(s) (our name <- file "
                   f"name): {', '.join(self.missing)}")
    if self.mis_shaped:
      lines.append(f"{len(self.mis_shaped)} mis-shaped key(s): " + ", ".join(
          f"{src} -> {ours} has shape {got}, the model expects {want}"
          for ours, src, got, want in self.mis_shaped))
    if self.unexpected and not allow_unexpected:
      lines.append(f"{len(self.unexpected)} unexpected key(s): "
                   f"{', '.join(self.unexpected)}")
    return lines

  def summary(self) -> str:
    parts = [f"{len(self.loaded)} arrays loaded"]
    for name in ("synthesized", "ignored", "unexpected"):
      keys = getattr(self, name)
      if keys:
        shown = ", ".join(keys[:8]) + (" ..." if len(keys) > 8 else "")
        parts.append(f"{len(keys)} {name} ({shown})")
    return "; ".join(parts)

  def to_json(self) -> Dict[str, Any]:
    return {"loaded": len(self.loaded), "ignored": self.ignored,
            "synthesized": self.synthesized, "unexpected": self.unexpected}


class Collector:
  """Accumulates converted arrays with the source key each came from."""

  def __init__(self, source: str):
    self.report = Report(source)
    self.arrays: Dict[str, np.ndarray] = {}
    self.origin: Dict[str, str] = {}

  def put(self, path: str, value: np.ndarray, src: str) -> None:
    if path in self.arrays:
      raise ConversionError(f"{self.report.source}: {src} and "
                            f"{self.origin[path]} both map to {path}")
    self.arrays[path] = np.asarray(value)
    self.origin[path] = src

  def ignore(self, src: str) -> None:
    self.report.ignored.append(src)

  def unexpected(self, src: str) -> None:
    self.report.unexpected.append(src)

  def synthesize(self, path: str, value: np.ndarray, why: str) -> None:
    self.put(path, value, f"<{why}>")
    self.report.synthesized.append(path)

  def finish(self, expected: Mapping[str, Shape], *,
             allow_unexpected: bool = False,
             source_names: Optional[Mapping[str, str]] = None
             ) -> Dict[str, np.ndarray]:
    """Checks against ``expected`` shapes; returns float32 arrays.

    Args:
      expected: ``{our path: shape}`` of the target model.
      allow_unexpected: report unexpected source keys without failing.
      source_names: ``our path -> file key`` used to name missing keys.

    Raises:
      ConversionError: naming every missing, mis-shaped and (unless
        allowed) unexpected key.
    """
    rep = self.report
    source_names = source_names or {}
    for path, value in self.arrays.items():
      if path not in expected:
        rep.unexpected.append(f"{self.origin[path]} (-> {path})")
      elif tuple(value.shape) != tuple(expected[path]):
        rep.mis_shaped.append((path, self.origin[path], tuple(value.shape),
                               tuple(expected[path])))
    for path in expected:
      if path not in self.arrays:
        src = source_names.get(path)
        rep.missing.append(f"{path} <- {src}" if src else path)
    problems = rep.problems(allow_unexpected)
    if problems:
      raise ConversionError(f"{rep.source}: " + "; ".join(problems))
    rep.loaded = sorted(p for p in self.arrays if p in expected)
    return {p: np.asarray(self.arrays[p], np.float32) for p in rep.loaded}


def split_collections(flat: Mapping[str, np.ndarray]
                      ) -> Dict[str, Dict[str, Any]]:
  """``{"params/a/b": x, "batch_stats/..": y}`` -> nested per collection."""
  out: Dict[str, Dict[Tuple[str, ...], np.ndarray]] = {}
  for key, value in flat.items():
    col, _, rest = key.partition("/")
    out.setdefault(col, {})[tuple(rest.split("/"))] = value
  return {col: traverse_util.unflatten_dict(tree)
          for col, tree in out.items()}


def strip_prefixes(sd: Mapping[str, Any], prefixes: Sequence[str]
                   ) -> Dict[str, Any]:
  """Removes any of ``prefixes`` (repeatedly) from the start of each key."""
  out = {}
  for key, value in sd.items():
    changed = True
    while changed:
      changed = False
      for p in prefixes:
        if key.startswith(p):
          key, changed = key[len(p):], True
    out[key] = value
  return out
