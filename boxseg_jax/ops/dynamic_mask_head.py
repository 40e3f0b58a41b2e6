"""CondInst dynamic mask head (reference §2.3) as per-instance einsums.

Each instance carries a flat parameter vector from the controller. Layout
(AdelaiDet `parse_dynamic_params`): all weights, then all biases,
`[W0, W1, ..., W_{L-1}, b0, b1, ..., b_{L-1}]`, each `W_l` row-major
`(out, in)`: `W0[o, i] = p[o * (C_in + 2) + i]`. With 16 mask channels,
8 hidden channels and 3 layers: `W0 [8, 18]`, `W1 [8, 8]`, `W2 [1, 8]`,
`b0 [8]`, `b1 [8]`, `b2 [1]` = 233 numbers. Input channel order is
`(rel_x, rel_y, mask_feats...)`.

Instance layout for batches: fixed slots per image, `[B, K, ...]`
(`dynamic_mask_logits_batched` vmaps the per-image function), so each
image's mask features are read once and never copied per instance.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from boxseg_jax.ops.aligned_bilinear import aligned_bilinear
from boxseg_jax.ops.locations import compute_locations

SIZES_OF_INTEREST = (64, 128, 256, 512)


def mask_head_soi(level: jnp.ndarray,
                  sizes_of_interest: Sequence[float] = SIZES_OF_INTEREST
                  ) -> jnp.ndarray:
  """Relative-coordinate normaliser of FPN `level`: `soi + [2 * soi[-1]]`.

  With the defaults: 64, 128, 256, 512, 1024 for P3..P7.
  """
  table = jnp.asarray(list(sizes_of_interest) + [2 * sizes_of_interest[-1]],
                      jnp.float32)
  return table[level]


def dynamic_param_shapes(in_channels: int, channels: int = 8,
                         num_layers: int = 3, rel_coords: bool = True
                         ) -> tuple[list[tuple[int, int]], list[int]]:
  """`(weight shapes (out, in) per layer, bias sizes per layer)`."""
  first_in = in_channels + (2 if rel_coords else 0)
  weights, biases = [], []
  for layer in range(num_layers):
    cin = first_in if layer == 0 else channels
    cout = 1 if layer == num_layers - 1 else channels
    weights.append((cout, cin))
    biases.append(cout)
  return weights, biases


def parse_dynamic_params(params: jnp.ndarray, in_channels: int,
                         channels: int = 8, num_layers: int = 3,
                         rel_coords: bool = True
                         ) -> tuple[list[jnp.ndarray], list[jnp.ndarray]]:
  """Splits `[..., P]` flat vectors into per-layer weights and biases.

  Returns:
    `(weights, biases)`: lists of `[..., out, in]` and `[..., out]`.

  Raises:
    ValueError: when `P` does not match the head configuration.
  """
  w_shapes, b_sizes = dynamic_param_shapes(in_channels, channels, num_layers,
                                           rel_coords)
  total = sum(o * i for o, i in w_shapes) + sum(b_sizes)
  if params.shape[-1] != total:
    raise ValueError(f'expected {total} dynamic params for in_channels='
                     f'{in_channels}, channels={channels}, num_layers='
                     f'{num_layers}, got {params.shape[-1]}')
  lead = params.shape[:-1]
  weights, biases, offset = [], [], 0
  for o, i in w_shapes:
    weights.append(params[..., offset:offset + o * i].reshape(lead + (o, i)))
    offset += o * i
  for o in b_sizes:
    biases.append(params[..., offset:offset + o])
    offset += o
  return weights, biases


def dynamic_mask_logits(mask_feats: jnp.ndarray,
                        params: jnp.ndarray,
                        inst_locations: jnp.ndarray,
                        inst_soi: jnp.ndarray,
                        *,
                        mask_feat_stride: int = 8,
                        mask_out_stride: int = 4,
                        channels: int = 8,
                        num_layers: int = 3,
                        rel_coords: bool = True) -> jnp.ndarray:
  """Mask logits of `n` instances of ONE image at `mask_out_stride`.

  Args:
    mask_feats: `[h8, w8, C]` mask-branch features of the image.
    params: `[n, P]` controller outputs of the instances.
    inst_locations: `[n, 2]` (x, y) pixel location of each instance's FCOS
      location.
    inst_soi: `[n]` size of interest of each instance's FPN level
      (`mask_head_soi`).
    mask_feat_stride: stride of `mask_feats` (8); pixel locations are
      `stride * i + stride // 2`.
    mask_out_stride: output stride (4); upsampled with `aligned_bilinear`.
    channels: hidden width of the head.
    num_layers: number of dynamic 1x1 layers.
    rel_coords: concatenate relative coordinates
      `(inst_loc - pixel_loc) / soi` (x first) in front of the features.

  Returns:
    `[n, h8 * f, w8 * f]` float32 logits, `f = mask_feat_stride //
    mask_out_stride`.
  """
  if mask_feat_stride % mask_out_stride:
    raise ValueError('mask_feat_stride must be a multiple of mask_out_stride')
  h, w, cin = mask_feats.shape
  feats = mask_feats.astype(jnp.float32)
  weights, biases = parse_dynamic_params(params.astype(jnp.float32), cin,
                                         channels, num_layers, rel_coords)
  w0 = weights[0]
  x = jnp.einsum('hwc,noc->nhwo', feats, w0[..., -cin:])
  if rel_coords:
    pix = jnp.asarray(compute_locations(h, w, mask_feat_stride)).reshape(
        h, w, 2)
    rel = (inst_locations.astype(jnp.float32)[:, None, None, :] - pix[None])
    rel = rel / inst_soi.astype(jnp.float32)[:, None, None, None]
    x = x + jnp.einsum('nhwk,nok->nhwo', rel, w0[..., :2])
  x = x + biases[0][:, None, None, :]
  for layer in range(1, num_layers):
    x = jax.nn.relu(x)
    x = jnp.einsum('nhwi,noi->nhwo', x, weights[layer])
    x = x + biases[layer][:, None, None, :]
  factor = mask_feat_stride // mask_out_stride
  return aligned_bilinear(x, factor)[..., 0]


def dynamic_mask_logits_batched(mask_feats: jnp.ndarray,
                                params: jnp.ndarray,
                                inst_locations: jnp.ndarray,
                                inst_soi: jnp.ndarray,
                                **kwargs) -> jnp.ndarray:
  """`dynamic_mask_logits` over images with per-image instance slots.

  Args:
    mask_feats: `[B, h8, w8, C]`.
    params: `[B, K, P]`.
    inst_locations: `[B, K, 2]`.
    inst_soi: `[B, K]`.
    **kwargs: passed to `dynamic_mask_logits`.

  Returns:
    `[B, K, h8 * f, w8 * f]` logits.
  """
  fn = lambda f, p, l, s: dynamic_mask_logits(f, p, l, s, **kwargs)
  return jax.vmap(fn)(mask_feats, params, inst_locations, inst_soi)
