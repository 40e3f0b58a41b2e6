"""Reading pickled weight files without executing pickled code.

Every record of every weight file we read (the legacy ``torch.save``
header records, the state-dict record, detectron2 ``.pkl`` files) goes
through ``RestrictedUnpickler``: its ``find_class`` returns only callables
from an explicit allow-list of *local* functions, and refuses (or, where a
format legitimately holds arbitrary objects, such as the ``args`` of a
training checkpoint, replaces by an inert ``Opaque`` record) every other
global. No module named in a pickle is ever imported. The pickle opcodes
that call something (REDUCE, BUILD, NEWOBJ, INST, OBJ, EXT*) all obtain
their callable through ``find_class``, so this one method is the whole
attack surface; persistent ids go to a caller-supplied loader that only
builds inert references.

Profiles (what each record may contain):

* ``NO_GLOBALS``: plain data (ints, strings, dicts, lists) -- the legacy
  torch header records (magic number, protocol, system info, storage keys);
* ``TORCH_GLOBALS`` + opaque: the torch state-dict record;
* ``NUMPY_GLOBALS``: numpy arrays as pickled by numpy (detectron2 ``.pkl``),
  rebuilt by local functions that accept only numeric dtypes.
"""

import collections
import io
import os
import pickle
import struct
import zipfile
from typing import Any, BinaryIO, Callable, Dict, Mapping, Optional, Tuple

import numpy as np


class CheckpointError(ValueError):
  """A weight file that cannot be read safely or has the wrong layout."""


class UnsafePickleError(CheckpointError):
  """A pickle asked for a global this reader does not admit."""


class Opaque:
  """Inert stand-in for a non-tensor global in a training checkpoint.

  Records constructor arguments and state; never runs the original code.
  """
  opaque_name = "?"

  def __new__(cls, *args, **kwargs):
    del kwargs
    obj = object.__new__(cls)
    obj.args = args
    obj.state = None
    return obj

  def __init__(self, *args, **kwargs):
    del args, kwargs

  def __setstate__(self, state):
    self.state = state

  def __repr__(self):
    return f"<opaque {self.opaque_name}>"


def _opaque_class(name: str):
  return type("Opaque_" + name.replace(".", "_"), (Opaque,),
              {"opaque_name": name})


class RestrictedUnpickler(pickle.Unpickler):
  """An unpickler that resolves only allow-listed globals.

  Args:
    file: binary stream positioned at one pickle record.
    allowed: ``(module, name) -> object`` returned by ``find_class``.
    opaque_other: other globals become inert ``Opaque`` classes instead of
      raising ``UnsafePickleError``.
    persistent_load: optional loader of persistent ids.
    source: file name for error messages.
  """

  def __init__(self, file: BinaryIO, *, allowed: Mapping[Tuple[str, str],
                                                         Any],
               opaque_other: bool = False,
               persistent_load: Optional[Callable[[Any], Any]] = None,
               source: str = "<stream>"):
    super().__init__(file, encoding="latin1")
    self._allowed = allowed
    self._opaque_other = opaque_other
    self._persistent = persistent_load
    self._source = source

  def find_class(self, module, name):
    key = (module, name)
    if key in self._allowed:
      return self._allowed[key]
    if self._opaque_other:
      return _opaque_class(f"{module}.{name}")
    raise UnsafePickleError(
        f"{self._source}: refusing pickled global {module}.{name} (this "
        "reader admits only plain data and tensors; nothing in the file is "
        "executed)")

  def persistent_load(self, pid):
    if self._persistent is None:
      raise UnsafePickleError(
          f"{self._source}: unexpected persistent id in a plain-data record")
    return self._persistent(pid)


def load_record(file: BinaryIO, source: str, *,
                allowed: Mapping[Tuple[str, str], Any] = None,
                opaque_other: bool = False,
                persistent_load=None) -> Any:
  """One pickle record through ``RestrictedUnpickler`` (errors name file)."""
  unpickler = RestrictedUnpickler(
      file, allowed=allowed or {}, opaque_other=opaque_other,
      persistent_load=persistent_load, source=source)
  try:
    return unpickler.load()
  except CheckpointError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointError(f"{source}: not a readable pickle ({e})") from e


# --- numpy arrays as numpy pickles them (detectron2 / MSRA .pkl). ------------

_NUMERIC_KINDS = "biufc"


def _np_dtype(spec, *unused):
  del unused
  dt = np.dtype(spec)
  if dt.kind not in _NUMERIC_KINDS:
    raise UnsafePickleError(f"refusing numpy dtype {dt!r} (numeric only)")
  return dt


def _np_reconstruct(cls, shape, dtype_code):
  del cls, dtype_code
  return _ArrayShell(shape)


class _ArrayShell:
  """What ``ndarray.__reduce__`` rebuilds, filled by ``__setstate__``."""

  def __init__(self, shape):
    del shape
    self.array = None

  def __setstate__(self, state):
    # (version, shape, dtype, is_fortran, raw bytes) for numeric arrays.
    _, shape, dtype, fortran, raw = state
    if not isinstance(dtype, np.dtype) or dtype.kind not in _NUMERIC_KINDS:
      raise UnsafePickleError(f"refusing array of dtype {dtype!r}")
    if isinstance(raw, str):  # written by Python 2 (MSRA .pkl files)
      raw = raw.encode("latin1")
    if not isinstance(raw, (bytes, bytearray)):
      raise UnsafePickleError("refusing an object array")
    shape = tuple(int(s) for s in shape)
    count = int(np.prod(shape)) if shape else 1
    if len(raw) != count * dtype.itemsize:
      raise CheckpointError(f"array data has {len(raw)} bytes, shape "
                            f"{shape} of {dtype} needs {count * dtype.itemsize}")
    arr = np.frombuffer(bytes(raw), dtype=dtype, count=count)
    self.array = arr.reshape(shape, order="F" if fortran else "C").copy()


def _np_frombuffer(buf, dtype, shape, order):
  """numpy's protocol-5 array reduction (``numpy._core.numeric``)."""
  if not isinstance(dtype, np.dtype) or dtype.kind not in _NUMERIC_KINDS:
    raise UnsafePickleError(f"refusing array of dtype {dtype!r}")
  shell = _ArrayShell(shape)
  shell.__setstate__((1, shape, dtype, order == "F", bytes(buf)))
  return shell.array


def _np_scalar(dtype, raw):
  if isinstance(raw, str):
    raw = raw.encode("latin1")
  if not isinstance(dtype, np.dtype) or dtype.kind not in _NUMERIC_KINDS:
    raise UnsafePickleError(f"refusing scalar of dtype {dtype!r}")
  return np.frombuffer(bytes(raw), dtype=dtype, count=1)[0]


def _latin1_encode(text, encoding="latin1"):
  """``_codecs.encode``: how protocol-2 pickles from Python 3 store bytes."""
  if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
    raise UnsafePickleError(f"refusing _codecs.encode({encoding!r})")
  return text.encode("latin1")


_BYTES_GLOBALS = {("_codecs", "encode"): _latin1_encode}

NUMPY_GLOBALS = {
    (mod, name): fn
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray")
    for name, fn in (("_reconstruct", _np_reconstruct),
                     ("scalar", _np_scalar))
}
NUMPY_GLOBALS.update({
    (mod, "_frombuffer"): _np_frombuffer
    for mod in ("numpy.core.numeric", "numpy._core.numeric")})
NUMPY_GLOBALS.update({
    ("numpy", "dtype"): _np_dtype,
    ("numpy", "ndarray"): np.ndarray,  # only passed to _reconstruct
    ("collections", "OrderedDict"): collections.OrderedDict,
})
NUMPY_GLOBALS.update(_BYTES_GLOBALS)


def unwrap_arrays(obj: Any) -> Any:
  """Replaces ``_ArrayShell``s by their arrays, recursively."""
  if isinstance(obj, _ArrayShell):
    if obj.array is None:
      raise CheckpointError("array record without data")
    return obj.array
  if isinstance(obj, dict):
    return type(obj)((k, unwrap_arrays(v)) for k, v in obj.items())
  if isinstance(obj, list):
    return [unwrap_arrays(v) for v in obj]
  if isinstance(obj, tuple):
    return tuple(unwrap_arrays(v) for v in obj)
  return obj


def read_numpy_pickle(path: str) -> Any:
  """A ``.pkl`` of python containers and numeric numpy arrays.

  Used for detectron2/MSRA weight files; object arrays, non-numeric dtypes
  and every other global are refused.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"weights not found: {path}")
  with open(path, "rb") as f:
    obj = load_record(f, path, allowed=NUMPY_GLOBALS)
  return unwrap_arrays(obj)


# --- torch.save files (zip and legacy stream formats). ----------------------

# torch storage class name -> numpy dtype ("bfloat16" handled separately).
STORAGE_DTYPES = {
    "DoubleStorage": np.float64,
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "BFloat16Storage": "bfloat16",
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}
_LEGACY_MAGIC = 0x1950a86a20f9469cfc6c


class _StorageType:

  def __init__(self, name: str):
    self.name = name
    self.dtype = STORAGE_DTYPES[name]


class _StorageRef:
  """A storage referenced by key; bytes are attached when known."""

  def __init__(self, key: str, stype: _StorageType, numel: Optional[int]):
    self.key = key
    self.stype = stype
    self.numel = numel
    self.data: Optional[bytes] = None


class _TensorRef:

  def __init__(self, storage, offset, size, stride):
    if not isinstance(storage, _StorageRef):
      raise UnsafePickleError(f"tensor rebuilt from {type(storage)}")
    self.storage = storage
    self.offset = int(offset)
    self.size = tuple(int(s) for s in size)
    self.stride = tuple(int(s) for s in stride)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, *unused):
  del unused  # requires_grad, backward_hooks, metadata
  return _TensorRef(storage, storage_offset, size, stride)


def _rebuild_tensor(storage, storage_offset, size, stride):
  return _TensorRef(storage, storage_offset, size, stride)


def _rebuild_parameter(data, *unused):
  del unused
  return data


TORCH_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "slice"): slice,
    ("builtins", "complex"): complex,
}
TORCH_GLOBALS.update(_BYTES_GLOBALS)
TORCH_GLOBALS.update({("torch", name): _StorageType(name)
                      for name in STORAGE_DTYPES})


def _storage_loader(storages: Dict[str, _StorageRef], source: str):
  """persistent_load for torch's ``('storage', type, key, ...)`` ids."""

  def load(pid):
    # zip: ('storage', type, key, location, numel)
    # legacy: ('storage', type, root_key, location, numel, view_metadata)
    if not isinstance(pid, tuple) or not pid or pid[0] != "storage":
      raise CheckpointError(f"{source}: unsupported persistent id {pid!r}")
    stype, key = pid[1], str(pid[2])
    if not isinstance(stype, _StorageType):
      raise CheckpointError(f"{source}: unsupported storage type {stype!r}")
    if len(pid) > 5 and pid[5] is not None:
      raise CheckpointError(f"{source}: legacy storage views are not "
                            "supported")
    if key not in storages:
      numel = int(pid[4]) if len(pid) > 4 else None
      storages[key] = _StorageRef(key, stype, numel)
    return storages[key]

  return load


def _materialize(obj: Any, byteorder: str) -> Any:
  """Replaces `_TensorRef`s by numpy arrays, recursively."""
  if isinstance(obj, _TensorRef):
    ref = obj.storage
    if ref.data is None:
      raise CheckpointError(f"storage {ref.key} has no data")
    dtype = ref.stype.dtype
    raw_dtype = np.dtype(np.uint16 if dtype == "bfloat16" else dtype)
    raw_dtype = raw_dtype.newbyteorder("<" if byteorder == "little" else ">")
    flat = np.frombuffer(ref.data, dtype=raw_dtype)
    if not obj.size:
      arr = flat[obj.offset:obj.offset + 1].reshape(())
    else:
      needed = obj.offset + 1 + sum(
          (s - 1) * st for s, st in zip(obj.size, obj.stride))
      if min(obj.size) > 0 and needed > flat.size:
        raise CheckpointError(f"storage {ref.key} is too short")
      arr = np.lib.stride_tricks.as_strided(
          flat[obj.offset:], shape=obj.size,
          strides=tuple(s * raw_dtype.itemsize for s in obj.stride))
    arr = np.array(arr, dtype=raw_dtype.newbyteorder("="))
    if dtype == "bfloat16":
      arr = (arr.astype(np.uint32) << 16).view(np.float32)
    return arr
  if isinstance(obj, dict):
    return type(obj)((k, _materialize(v, byteorder)) for k, v in obj.items())
  if isinstance(obj, list):
    return [_materialize(v, byteorder) for v in obj]
  if isinstance(obj, tuple):
    return tuple(_materialize(v, byteorder) for v in obj)
  return obj


def _read_zip(path: str) -> Any:
  with zipfile.ZipFile(path) as zf:
    names = zf.namelist()
    pkl = [n for n in names if n.endswith("data.pkl")]
    if len(pkl) != 1:
      raise CheckpointError(f"{path}: expected one data.pkl, found {pkl}")
    prefix = pkl[0][:-len("data.pkl")]
    byteorder = "little"
    if prefix + "byteorder" in names:
      byteorder = zf.read(prefix + "byteorder").decode().strip()
      if byteorder not in ("little", "big"):
        raise CheckpointError(f"{path}: bad byteorder {byteorder!r}")
    storages: Dict[str, _StorageRef] = {}
    obj = load_record(io.BytesIO(zf.read(pkl[0])), path,
                      allowed=TORCH_GLOBALS, opaque_other=True,
                      persistent_load=_storage_loader(storages, path))
    for key, ref in storages.items():
      name = f"{prefix}data/{key}"
      if name not in names:
        raise CheckpointError(f"{path}: missing tensor data {name}")
      ref.data = zf.read(name)
  return _materialize(obj, byteorder)


def _read_legacy(path: str) -> Any:
  with open(path, "rb") as f:
    # Header records hold plain data only: no global is admitted.
    magic = load_record(f, path)
    if magic != _LEGACY_MAGIC:
      raise CheckpointError(f"{path}: not a PyTorch checkpoint (bad magic)")
    load_record(f, path)  # protocol version
    sys_info = load_record(f, path)
    little = True
    if isinstance(sys_info, dict):
      little = bool(sys_info.get("little_endian", True))
    storages: Dict[str, _StorageRef] = {}
    obj = load_record(f, path, allowed=TORCH_GLOBALS, opaque_other=True,
                      persistent_load=_storage_loader(storages, path))
    keys = load_record(f, path)
    if not isinstance(keys, (list, tuple)):
      raise CheckpointError(f"{path}: storage key record is not a list")
    for key in keys:
      if str(key) not in storages:
        raise CheckpointError(f"{path}: unknown storage key {key!r}")
      ref = storages[str(key)]
      (numel,) = struct.unpack("<q" if little else ">q", f.read(8))
      itemsize = 2 if ref.stype.dtype == "bfloat16" else np.dtype(
          ref.stype.dtype).itemsize
      ref.data = f.read(numel * itemsize)
      if len(ref.data) != numel * itemsize:
        raise CheckpointError(f"{path}: truncated storage {key}")
  return _materialize(obj, "little" if little else "big")


def read_torch_checkpoint(path: str) -> Any:
  """Reads a `torch.save` file into python containers of numpy arrays.

  No pickled code is executed (module docstring); torch is not needed.

  Args:
    path: a `.pth`/`.pt` file in zip or legacy format.

  Returns:
    The saved object with every tensor replaced by a numpy array (bfloat16
    becomes float32); non-tensor objects become inert ``Opaque`` records.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"checkpoint not found: {path}")
  if zipfile.is_zipfile(path):
    return _read_zip(path)
  return _read_legacy(path)


def load_npz(path: str, what: str = "weights") -> Dict[str, np.ndarray]:
  """All arrays of an ``.npz`` without pickle (object arrays refused).

  Args:
    path: the file.
    what: the config field or flag that named it, for messages.
  """
  try:
    with np.load(path, allow_pickle=False) as data:
      return {k: data[k] for k in data.files}
  except ValueError as e:
    if "allow_pickle" in str(e) or "Object arrays" in str(e):
      raise UnsafePickleError(
          f"{what}={path}: holds an object array (pickled Python objects); "
          "refusing to load it. Convert weights with `python -m "
          "boxseg_jax.convert`, which writes numeric arrays only.") from e
    raise CheckpointError(f"{what}={path}: not a readable .npz ({e})") from e
  except (OSError, zipfile.BadZipFile, EOFError) as e:
    raise CheckpointError(f"{what}={path}: not a readable .npz ({e})") from e
