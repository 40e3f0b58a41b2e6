"""DINO Vision Transformer (ViT-S/16, ViT-S/8, ViT-B/16, ViT-B/8) in Flax, NHWC.

Architecture of DINO's `vision_transformer.py` as used by CutLER's `ViTFeat`
(reference §5.2): conv patch embedding, a CLS token, learned position
embeddings trained on a `grid0 x grid0` grid (224 / patch) and resized to the
input grid with PyTorch's bicubic interpolation (A = -0.75,
align_corners=False, `scale_factor = (grid + 0.1) / grid0`), pre-norm blocks
with LayerNorm eps 1e-6, qkv bias, exact (erf) GELU.

The MaskCut feature is the *keys* of the last block's attention: the input of
the last block's `qkv` Linear is `norm1(x)`; the k slice is taken with all
heads concatenated (channel = head * head_dim + d) and the CLS token dropped.

Parameter names mirror the DINO checkpoint (`blocks.3.attn.qkv.weight` ->
`blocks_3/attn/qkv/kernel`) so that `boxseg_jax.convert.dino` maps keys one
to one.
"""

import math
from typing import Any, Dict, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any

# name -> (embed_dim, depth, num_heads, patch_size): DINO vit_small / vit_base.
ARCHS = {
    "vit_small16": (384, 12, 6, 16),
    "vit_small8": (384, 12, 6, 8),
    "vit_base16": (768, 12, 12, 16),
    "vit_base8": (768, 12, 12, 8),
}
PRETRAIN_SIZE = 224
LAYER_NORM_EPS = 1e-6
# ImageNet statistics used by `ViTFeat`'s ToTensor + Normalize.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# DINO `trunc_normal_(std=.02)` for Linear weights, pos_embed and cls_token.
_trunc_init = nn.initializers.truncated_normal(stddev=0.02)


def _cubic_weights(t: np.ndarray, a: float = -0.75) -> np.ndarray:
  """PyTorch `get_cubic_upsample_coefficients`; t [...] -> [..., 4] float32."""
  t = t.astype(np.float32)
  a = np.float32(a)

  def conv1(x):  # |x| <= 1
    return ((a + 2) * x - (a + 3)) * x * x + 1

  def conv2(x):  # 1 < |x| < 2
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

  one = np.float32(1)
  return np.stack(
      [conv2(t + one), conv1(t), conv1(one - t), conv2(one - t + one)], -1)


def bicubic_matrix(in_size: int, out_size: int, scale_factor: float
                  ) -> np.ndarray:
  """1-D bicubic resize of PyTorch `interpolate(scale_factor=s)`, as a matrix.

  Mirrors `upsample_bicubic2d` with align_corners=False when a scale factor is
  given: source coordinate `(o + 0.5) / s - 0.5` in float32, A = -0.75,
  neighbour indices clamped to the border.

  Args:
    in_size: source length.
    out_size: output length (`floor(in_size * s)` in PyTorch).
    scale_factor: the `scale_factor` passed to `interpolate`.

  Returns:
    [out_size, in_size] float32 matrix W with `out = W @ in`.
  """
  scale = np.float32(1.0 / scale_factor)
  dst = np.arange(out_size, dtype=np.float32)
  real = scale * (dst + np.float32(0.5)) - np.float32(0.5)
  base = np.floor(real)
  coeffs = _cubic_weights(real - base)
  mat = np.zeros((out_size, in_size), np.float32)
  for k in range(4):
    idx = np.clip(base.astype(np.int64) - 1 + k, 0, in_size - 1)
    np.add.at(mat, (np.arange(out_size), idx), coeffs[:, k])
  return mat


def interpolate_pos_embed(pos_embed: jax.Array, grid_hw: Tuple[int, int],
                          image_hw: Tuple[int, int]) -> jax.Array:
  """DINO `interpolate_pos_encoding` for one static input size.

  Args:
    pos_embed: [1, 1 + g0 * g0, D] trained table (CLS first).
    grid_hw: (h, w) patch grid of the input.
    image_hw: (H, W) input size in pixels; DINO skips the interpolation only
      when the number of patches matches *and* H == W.

  Returns:
    [1, 1 + h * w, D] table (row-major patch order).
  """
  num_trained = pos_embed.shape[1] - 1
  h, w = grid_hw
  if h * w == num_trained and image_hw[0] == image_hw[1]:
    return pos_embed
  g0 = int(math.sqrt(num_trained))
  dim = pos_embed.shape[-1]
  # `(grid + 0.1) / g0` avoids float floor errors in PyTorch's output size,
  # and is also the scale used for the source coordinates.
  mat_h = jnp.asarray(bicubic_matrix(g0, h, (h + 0.1) / g0))
  mat_w = jnp.asarray(bicubic_matrix(g0, w, (w + 0.1) / g0))
  grid = pos_embed[0, 1:].reshape(g0, g0, dim)
  hp = jax.lax.Precision.HIGHEST
  out = jnp.einsum("oi,ijd->ojd", mat_h, grid, precision=hp)
  out = jnp.einsum("pj,ojd->opd", mat_w, out, precision=hp)
  return jnp.concatenate(
      [pos_embed[:, :1], out.reshape(1, h * w, dim)], axis=1)


class Mlp(nn.Module):
  """fc1 -> exact GELU -> fc2."""
  hidden_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    dim = x.shape[-1]
    x = nn.Dense(self.hidden_dim, kernel_init=_trunc_init, dtype=self.dtype,
                 param_dtype=self.param_dtype, name="fc1")(x)
    x = nn.gelu(x, approximate=False)
    return nn.Dense(dim, kernel_init=_trunc_init, dtype=self.dtype,
                    param_dtype=self.param_dtype, name="fc2")(x)


class Attention(nn.Module):
  """Multi-head self-attention; also returns q, k, v per head."""
  num_heads: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, qkv_only: bool = False
               ) -> Dict[str, jax.Array]:
    b, n, dim = x.shape
    head_dim = dim // self.num_heads
    qkv = nn.Dense(3 * dim, kernel_init=_trunc_init, dtype=self.dtype,
                   param_dtype=self.param_dtype, name="qkv")(x)
    # DINO layout: [B, N, 3, heads, head_dim].
    qkv = qkv.reshape(b, n, 3, self.num_heads, head_dim)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    out = {"q": q, "k": k, "v": v}
    if qkv_only:
      return out
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) * head_dim**-0.5
    attn = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    y = jnp.einsum("bhqk,bkhd->bqhd", attn.astype(self.dtype), v)
    y = nn.Dense(dim, kernel_init=_trunc_init, dtype=self.dtype,
                 param_dtype=self.param_dtype, name="proj")(
                     y.reshape(b, n, dim))
    out["out"] = y
    out["attn"] = attn
    return out


class Block(nn.Module):
  """Pre-norm transformer block: x + attn(norm1(x)); x + mlp(norm2(x))."""
  num_heads: int
  mlp_ratio: float = 4.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, qkv_only: bool = False
               ) -> Tuple[jax.Array, Dict[str, jax.Array]]:
    dim = x.shape[-1]
    norm = lambda name: nn.LayerNorm(  # pylint: disable=g-long-lambda
        epsilon=LAYER_NORM_EPS, dtype=self.dtype,
        param_dtype=self.param_dtype, name=name)
    attn = Attention(self.num_heads, dtype=self.dtype,
                     param_dtype=self.param_dtype, name="attn")(
                         norm("norm1")(x), qkv_only=qkv_only)
    if qkv_only:
      return x, attn
    x = x + attn["out"]
    x = x + Mlp(int(dim * self.mlp_ratio), dtype=self.dtype,
                param_dtype=self.param_dtype, name="mlp")(norm("norm2")(x))
    return x, attn


class VisionTransformer(nn.Module):
  """DINO ViT backbone (no classification head).

  Attributes:
    embed_dim: token width D.
    depth: number of blocks.
    num_heads: attention heads (head_dim = D / heads).
    patch_size: patch side p (the input is cropped to multiples of p, as the
      stride-p convolution does).
    features_only: stop after the last block's qkv projection (MaskCut needs
      only its keys); the last block's proj/mlp and the final norm are skipped.
      Initialise with False to create every parameter.
  """
  embed_dim: int = 384
  depth: int = 12
  num_heads: int = 6
  patch_size: int = 16
  mlp_ratio: float = 4.0
  features_only: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, image: jax.Array) -> Dict[str, jax.Array]:
    """Runs the backbone.

    Args:
      image: [B, H, W, 3] float, already ImageNet-normalised.

    Returns:
      Dict with "k", "q", "v": [B, h * w, D] last-block attention keys /
      queries / values of the patch tokens (CLS dropped, heads concatenated,
      row-major patch order, h = H // p, w = W // p); and, unless
      `features_only`, "tokens" [B, 1 + h * w, D] after the final norm and
      "cls" [B, D].
    """
    p = self.patch_size
    b, height, width, _ = image.shape
    h, w = height // p, width // p
    x = nn.Conv(self.embed_dim, (p, p), strides=(p, p), padding="VALID",
                dtype=self.dtype, param_dtype=self.param_dtype,
                name="patch_embed")(image.astype(self.dtype))
    x = x.reshape(b, h * w, self.embed_dim)
    cls = self.param("cls_token", _trunc_init, (1, 1, self.embed_dim),
                     self.param_dtype)
    pos = self.param("pos_embed", _trunc_init,
                     (1, 1 + (PRETRAIN_SIZE // p)**2, self.embed_dim),
                     self.param_dtype)
    x = jnp.concatenate(
        [jnp.broadcast_to(cls.astype(self.dtype), (b, 1, self.embed_dim)), x],
        axis=1)
    x = x + interpolate_pos_embed(pos, (h, w), (height, width)).astype(
        self.dtype)
    attn = None
    for i in range(self.depth):
      last = i == self.depth - 1
      x, attn = Block(self.num_heads, self.mlp_ratio, dtype=self.dtype,
                      param_dtype=self.param_dtype, name=f"blocks_{i}")(
                          x, qkv_only=last and self.features_only)
    out = {}
    for name in ("q", "k", "v"):
      out[name] = attn[name][:, 1:].reshape(b, h * w, self.embed_dim)
    if not self.features_only:
      x = nn.LayerNorm(epsilon=LAYER_NORM_EPS, dtype=self.dtype,
                       param_dtype=self.param_dtype, name="norm")(x)
      out["tokens"] = x
      out["cls"] = x[:, 0]
    return out


def make_vit(arch: str, *, features_only: bool = True,
             dtype: Dtype = jnp.float32) -> VisionTransformer:
  """Builds one of `ARCHS` ("vit_small16", ..., "vit_base8")."""
  if arch not in ARCHS:
    raise ValueError(f"unknown ViT arch {arch!r}; expected one of "
                     f"{sorted(ARCHS)}")
  dim, depth, heads, patch = ARCHS[arch]
  return VisionTransformer(embed_dim=dim, depth=depth, num_heads=heads,
                           patch_size=patch, features_only=features_only,
                           dtype=dtype)


def normalize_image(image: jax.Array) -> jax.Array:
  """uint8-valued RGB [..., 3] -> ImageNet-normalised float32 (ToTensor)."""
  mean = jnp.asarray(IMAGENET_MEAN, jnp.float32)
  std = jnp.asarray(IMAGENET_STD, jnp.float32)
  return (image.astype(jnp.float32) / 255.0 - mean) / std
