"""DINO ViT checkpoints (PyTorch `.pth`) -> Flax params of `maskcut.vit`.

Reads `torch.save` files **without executing pickled code**: the pickle is
parsed by a restricted unpickler whose `find_class` only resolves a fixed set
of tensor-rebuilding names to local numpy functions; any other global becomes
an inert stand-in object (so full training checkpoints with `argparse.Namespace`
or optimizer state still parse, and nothing from them is called). Both the
zip format (torch >= 1.6) and the legacy tar-less stream format are read.
torch itself is not needed.

Key layout of the official DINO backbone checkpoints
(`dino_deitsmall16_pretrain.pth`, `dino_deitsmall8_pretrain.pth`,
`dino_vitbase16_pretrain.pth`, `dino_vitbase8_pretrain.pth`), D = embed dim,
p = patch size, g0 = 224 / p:

  cls_token                 [1, 1, D]
  pos_embed                 [1, 1 + g0 * g0, D]
  patch_embed.proj.weight   [D, 3, p, p]      -> patch_embed/kernel [p, p, 3, D]
  patch_embed.proj.bias     [D]
  blocks.{i}.norm1.{weight,bias}              -> blocks_{i}/norm1/{scale,bias}
  blocks.{i}.attn.qkv.{weight [3D, D], bias}  -> blocks_{i}/attn/qkv/kernel^T
  blocks.{i}.attn.proj.{weight [D, D], bias}
  blocks.{i}.norm2.{weight,bias}
  blocks.{i}.mlp.fc1.{weight [4D, D], bias}
  blocks.{i}.mlp.fc2.{weight [D, 4D], bias}
  norm.{weight,bias}

Full DINO training checkpoints (`*_full_checkpoint.pth`) nest this under
"teacher" / "student" with "module." and "backbone." prefixes; `load_dino`
takes the teacher by default (as DINO's own evaluation does) and ignores the
projection "head.*" keys there.
"""

import collections
import io
import os
import pickle
import struct
import zipfile
from typing import Any, BinaryIO, Dict, Optional, Tuple

import numpy as np

# torch storage class name -> numpy dtype ("bfloat16" handled separately).
_STORAGE_DTYPES = {
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
_HEAD_DIM = 64  # every DINO ViT uses 64-dim heads (ViT-S: 6, ViT-B: 12).


class CheckpointError(ValueError):
  """A checkpoint that cannot be read or does not match a DINO ViT."""


class _Opaque:
  """Inert stand-in for any non-tensor global found in a pickle.

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
  return type("Opaque_" + name.replace(".", "_"), (_Opaque,),
              {"opaque_name": name})


class _StorageType:

  def __init__(self, name: str):
    self.name = name
    self.dtype = _STORAGE_DTYPES[name]


class _StorageRef:
  """A storage referenced by key; bytes are attached when known."""

  def __init__(self, key: str, stype: _StorageType, numel: Optional[int]):
    self.key = key
    self.stype = stype
    self.numel = numel
    self.data: Optional[bytes] = None


class _TensorRef:

  def __init__(self, storage, offset, size, stride):
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


_SAFE_GLOBALS = {
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


class _Unpickler(pickle.Unpickler):
  """Resolves only tensor rebuilding; everything else becomes `_Opaque`."""

  def __init__(self, file: BinaryIO, storages: Dict[str, _StorageRef]):
    super().__init__(file, encoding="latin1")
    self._storages = storages

  def find_class(self, module, name):
    if (module, name) in _SAFE_GLOBALS:
      return _SAFE_GLOBALS[(module, name)]
    if module == "torch" and name in _STORAGE_DTYPES:
      return _StorageType(name)
    return _opaque_class(f"{module}.{name}")

  def persistent_load(self, pid):
    # zip: ('storage', type, key, location, numel)
    # legacy: ('storage', type, root_key, location, numel, view_metadata)
    if not isinstance(pid, tuple) or not pid or pid[0] != "storage":
      raise CheckpointError(f"unsupported persistent id {pid!r}")
    stype, key = pid[1], str(pid[2])
    if not isinstance(stype, _StorageType):
      # torch >= 2 may pickle `torch.storage.UntypedStorage` with a dtype.
      raise CheckpointError(f"unsupported storage type {stype!r}")
    if len(pid) > 5 and pid[5] is not None:
      raise CheckpointError("legacy storage views are not supported")
    if key not in self._storages:
      numel = int(pid[4]) if len(pid) > 4 else None
      self._storages[key] = _StorageRef(key, stype, numel)
    return self._storages[key]


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
    storages: Dict[str, _StorageRef] = {}
    obj = _Unpickler(io.BytesIO(zf.read(pkl[0])), storages).load()
    for key, ref in storages.items():
      name = f"{prefix}data/{key}"
      if name not in names:
        raise CheckpointError(f"{path}: missing tensor data {name}")
      ref.data = zf.read(name)
  return _materialize(obj, byteorder)


def _read_legacy(path: str) -> Any:
  with open(path, "rb") as f:
    head = pickle.Unpickler(f)
    try:
      magic = head.load()
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(f"{path}: not a PyTorch checkpoint ({e})") from e
    if magic != _LEGACY_MAGIC:
      raise CheckpointError(f"{path}: not a PyTorch checkpoint (bad magic)")
    pickle.Unpickler(f).load()  # protocol version
    sys_info = pickle.Unpickler(f).load()
    little = True
    if isinstance(sys_info, dict):
      little = sys_info.get("little_endian", True)
    storages: Dict[str, _StorageRef] = {}
    obj = _Unpickler(f, storages).load()
    keys = pickle.Unpickler(f).load()
    for key in keys:
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

  No pickled code is executed: only tensor rebuilding and OrderedDict are
  resolved; any other class becomes an inert `_Opaque` record.

  Args:
    path: a `.pth`/`.pt` file in zip or legacy format.

  Returns:
    The saved object with every tensor replaced by a numpy array (bfloat16
    becomes float32).
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"checkpoint not found: {path}")
  if zipfile.is_zipfile(path):
    return _read_zip(path)
  return _read_legacy(path)


def _strip(sd: Dict[str, Any]) -> Dict[str, Any]:
  out = {}
  for k, v in sd.items():
    for prefix in ("module.", "backbone."):
      if k.startswith(prefix):
        k = k[len(prefix):]
    out[k] = v
  return out


def extract_state_dict(ckpt: Any, checkpoint_key: str = "teacher"
                       ) -> Dict[str, np.ndarray]:
  """Finds the backbone state dict in a plain or full DINO checkpoint."""
  if not isinstance(ckpt, dict):
    raise CheckpointError(f"expected a dict checkpoint, got {type(ckpt)}")
  if checkpoint_key in ckpt and isinstance(ckpt[checkpoint_key], dict):
    sd = _strip(ckpt[checkpoint_key])
    return {k: v for k, v in sd.items() if not k.startswith("head.")}
  for key in ("state_dict", "model"):
    if key in ckpt and isinstance(ckpt[key], dict):
      return _strip(ckpt[key])
  return _strip(ckpt)


def infer_arch(sd: Dict[str, np.ndarray]) -> Dict[str, int]:
  """embed_dim, depth, num_heads, patch_size from key shapes."""
  try:
    proj = sd["patch_embed.proj.weight"]
  except KeyError as e:
    raise CheckpointError(
        "not a DINO ViT state dict: no 'patch_embed.proj.weight' (keys: "
        f"{sorted(sd)[:8]}...)") from e
  dim, _, patch, _ = proj.shape
  depth = 1 + max(
      int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
  return dict(embed_dim=int(dim), depth=int(depth),
              num_heads=int(dim) // _HEAD_DIM, patch_size=int(patch))


def arch_name(arch: Dict[str, int]) -> Optional[str]:
  """"vit_base8" etc. when `arch` is one of the four DINO models."""
  size = {384: "small", 768: "base"}.get(arch["embed_dim"])
  if size is None or arch["depth"] != 12:
    return None
  return f"vit_{size}{arch['patch_size']}"


def convert_state_dict(sd: Dict[str, np.ndarray]) -> Dict[str, Any]:
  """Maps DINO keys to the nested Flax params of `vit.VisionTransformer`.

  Every key must be consumed (like `load_state_dict(strict=True)`).

  Args:
    sd: flat DINO state dict of numpy arrays.

  Returns:
    Nested dict of float32 numpy arrays (the `params` collection).
  """
  sd = dict(sd)
  arch = infer_arch(sd)
  dim, depth, patch = arch["embed_dim"], arch["depth"], arch["patch_size"]

  def take(key, shape):
    if key not in sd:
      raise CheckpointError(f"missing key {key!r}")
    v = np.asarray(sd.pop(key), np.float32)
    if v.shape != tuple(shape):
      raise CheckpointError(f"{key}: shape {v.shape}, expected {shape}")
    return v

  def linear(prefix, n_in, n_out):
    return {"kernel": take(prefix + ".weight", (n_out, n_in)).T.copy(),
            "bias": take(prefix + ".bias", (n_out,))}

  def norm(prefix):
    return {"scale": take(prefix + ".weight", (dim,)),
            "bias": take(prefix + ".bias", (dim,))}

  pos = sd.get("pos_embed")
  if pos is None or pos.ndim != 3:
    raise CheckpointError("missing or malformed 'pos_embed'")
  params: Dict[str, Any] = {
      "cls_token": take("cls_token", (1, 1, dim)),
      "pos_embed": take("pos_embed", (1, pos.shape[1], dim)),
      "patch_embed": {
          "kernel": take("patch_embed.proj.weight",
                         (dim, 3, patch, patch)).transpose(2, 3, 1, 0).copy(),
          "bias": take("patch_embed.proj.bias", (dim,)),
      },
      "norm": norm("norm"),
  }
  hidden = 4 * dim
  for i in range(depth):
    b = f"blocks.{i}"
    params[f"blocks_{i}"] = {
        "norm1": norm(b + ".norm1"),
        "attn": {"qkv": linear(b + ".attn.qkv", dim, 3 * dim),
                 "proj": linear(b + ".attn.proj", dim, dim)},
        "norm2": norm(b + ".norm2"),
        "mlp": {"fc1": linear(b + ".mlp.fc1", dim, hidden),
                "fc2": linear(b + ".mlp.fc2", hidden, dim)},
    }
  if sd:
    raise CheckpointError(f"unexpected keys in checkpoint: {sorted(sd)}")
  return params


def load_dino(path: str, checkpoint_key: str = "teacher"
              ) -> Tuple[Dict[str, Any], Dict[str, int]]:
  """Reads a DINO checkpoint file.

  Args:
    path: `.pth` file (backbone-only or full training checkpoint).
    checkpoint_key: which network of a full checkpoint to take.

  Returns:
    (params, arch): Flax `params` tree for `vit.VisionTransformer` and the
    inferred architecture dict (embed_dim, depth, num_heads, patch_size).
  """
  sd = extract_state_dict(read_torch_checkpoint(path), checkpoint_key)
  sd = {k: v for k, v in sd.items() if isinstance(v, np.ndarray)}
  try:
    return convert_state_dict(sd), infer_arch(sd)
  except CheckpointError as e:
    raise CheckpointError(f"{path}: {e}") from e


def dino_key_shapes(embed_dim: int, depth: int, patch_size: int
                    ) -> Dict[str, Tuple[int, ...]]:
  """The published DINO backbone state-dict layout (key -> shape)."""
  d, p = embed_dim, patch_size
  g0 = 224 // p
  shapes = {
      "cls_token": (1, 1, d),
      "pos_embed": (1, 1 + g0 * g0, d),
      "patch_embed.proj.weight": (d, 3, p, p),
      "patch_embed.proj.bias": (d,),
  }
  for i in range(depth):
    b = f"blocks.{i}."
    shapes.update({
        b + "norm1.weight": (d,), b + "norm1.bias": (d,),
        b + "attn.qkv.weight": (3 * d, d), b + "attn.qkv.bias": (3 * d,),
        b + "attn.proj.weight": (d, d), b + "attn.proj.bias": (d,),
        b + "norm2.weight": (d,), b + "norm2.bias": (d,),
        b + "mlp.fc1.weight": (4 * d, d), b + "mlp.fc1.bias": (4 * d,),
        b + "mlp.fc2.weight": (d, 4 * d), b + "mlp.fc2.bias": (d,),
    })
  shapes["norm.weight"] = (d,)
  shapes["norm.bias"] = (d,)
  return shapes
