"""DINO ViT checkpoints (PyTorch `.pth`) -> Flax params of `maskcut.vit`.

Reads `torch.save` files **without executing pickled code**, through
`convert.safe_pickle` (every record, the legacy header records included, is
parsed by a restricted unpickler; see that module). Both the zip format
(torch >= 1.6) and the legacy stream format are read; torch itself is not
needed.

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

from typing import Any, Dict, Optional, Tuple

import numpy as np

from boxseg_jax.convert import safe_pickle
from boxseg_jax.convert.safe_pickle import CheckpointError
from boxseg_jax.convert.safe_pickle import read_torch_checkpoint

_HEAD_DIM = 64  # every DINO ViT uses 64-dim heads (ViT-S: 6, ViT-B: 12).
_Opaque = safe_pickle.Opaque  # inert stand-in for non-tensor globals


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
