"""Writes ``torch.save``-format zip files without torch (test helper).

The pickle goes through stand-in modules named like torch's, so the stream
has the same GLOBAL (``torch._utils._rebuild_tensor_v2``,
``torch.FloatStorage``, ...) and persistent-id records as a real file.
Nested dicts of numpy arrays (float32, int64, any rank) are supported.
"""

import collections
import io
import pickle
import sys
import types
import zipfile

import numpy as np

_STORAGES = {np.dtype(np.float32): "FloatStorage",
             np.dtype(np.int64): "LongStorage",
             np.dtype(np.float16): "HalfStorage"}


def _fake_modules():
  torch_mod = types.ModuleType("torch")
  utils_mod = types.ModuleType("torch._utils")
  for name in _STORAGES.values():
    cls = type(name, (), {})
    cls.__module__ = "torch"
    cls.__qualname__ = name
    setattr(torch_mod, name, cls)

  def _rebuild_tensor_v2(*args):
    del args

  _rebuild_tensor_v2.__module__ = "torch._utils"
  _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
  utils_mod._rebuild_tensor_v2 = _rebuild_tensor_v2
  torch_mod._utils = utils_mod
  return torch_mod, utils_mod


class _Storage:

  def __init__(self, pid):
    self.pid = pid


class _Tensor:

  def __init__(self, key, arr, modules):
    self.key, self.arr = key, arr
    self._torch, self._utils = modules

  def __reduce__(self):
    cls = getattr(self._torch, _STORAGES[self.arr.dtype])
    storage = ("storage", cls, self.key, "cpu", self.arr.size)
    strides = tuple(s // self.arr.itemsize for s in self.arr.strides)
    return (self._utils._rebuild_tensor_v2,
            (_Storage(storage), 0, self.arr.shape, strides, False,
             collections.OrderedDict()))


def save(path, obj):
  """``torch.save(obj, path)`` for nested dicts of numpy arrays."""
  modules = _fake_modules()
  tensors = []

  def wrap(x):
    if isinstance(x, np.ndarray):
      arr = np.ascontiguousarray(x)
      if arr.dtype not in _STORAGES:
        arr = arr.astype(np.float32)
      t = _Tensor(str(len(tensors)), arr, modules)
      tensors.append(t)
      return t
    if isinstance(x, dict):
      return collections.OrderedDict((k, wrap(v)) for k, v in x.items())
    return x

  wrapped = wrap(obj)
  buf = io.BytesIO()
  pickler = pickle.Pickler(buf, protocol=2)
  pickler.persistent_id = lambda o: o.pid if isinstance(o, _Storage) else None
  # The stand-ins replace torch in sys.modules only while pickling.
  saved = {k: sys.modules.get(k) for k in ("torch", "torch._utils")}
  sys.modules["torch"], sys.modules["torch._utils"] = modules
  try:
    pickler.dump(wrapped)
  finally:
    for k, v in saved.items():
      if v is None:
        sys.modules.pop(k, None)
      else:
        sys.modules[k] = v
  with zipfile.ZipFile(path, "w") as zf:
    zf.writestr("archive/data.pkl", buf.getvalue())
    zf.writestr("archive/byteorder", "little")
    zf.writestr("archive/version", "3\n")
    for t in tensors:
      zf.writestr(f"archive/data/{t.key}", t.arr.tobytes())


def random_arrays(shapes, seed=0):
  """Random float32 arrays (int64 zeros for ``num_batches_tracked``)."""
  rng = np.random.default_rng(seed)
  out = {}
  for k, s in shapes.items():
    if k.endswith("num_batches_tracked"):
      out[k] = np.array(7, np.int64)
    elif "running_var" in k or k.endswith("_riv"):
      out[k] = rng.uniform(0.5, 2.0, s).astype(np.float32)
    else:
      out[k] = rng.standard_normal(s).astype(np.float32)
  return out


def zero_arrays(shapes):
  """Shape-only (stride-0, no memory) zero arrays for layout tests."""
  z = np.zeros((1,), np.float32)
  return {k: np.lib.stride_tricks.as_strided(z, s, (0,) * len(s))
          for k, s in shapes.items()}
