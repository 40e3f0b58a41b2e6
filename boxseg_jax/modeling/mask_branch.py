"""CondInst mask branch (AdelaiDet `MaskBranch`), NHWC.

Each input level (P3, P4, P5) is refined by conv3x3 -> `channels` (no bias) +
BatchNorm + ReLU; the coarser refined maps are upsampled to the P3 grid with
`aligned_bilinear` (x2, x4) and summed. A tower of `num_convs` x
[conv3x3 + BatchNorm + ReLU] follows, then a plain 1x1 conv (with bias) to
`out_channels`. Output stride 8.

BatchNorm is plain (not synced in the reference): trainable scale/bias in
`params`, running statistics in the `batch_stats` collection, batch statistics
when `train=True` (momentum 0.9 in Flax convention = torch 0.1, eps 1e-5).

Names: `refine_{i}/{conv,norm}` <- `mask_branch.refine.{i}.{0,1}`,
`tower_{i}/{conv,norm}` <- `mask_branch.tower.{i}.{0,1}` (i < num_convs),
`tower_{num_convs}` <- `mask_branch.tower.{num_convs}` (the 1x1 conv).
"""

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from boxseg_jax.modeling.fpn import c2_xavier_init
from boxseg_jax.ops.aligned_bilinear import aligned_bilinear

Dtype = Any

BN_MOMENTUM = 0.9
BN_EPS = 1e-5

# PyTorch's default Conv2d init (kaiming_uniform_, a = sqrt(5)):
# weight bound sqrt(1 / fan_in).
torch_default_kernel_init = nn.initializers.variance_scaling(
    1.0 / 3.0, "fan_in", "uniform")


def torch_default_bias_init(fan_in: int):
  """PyTorch's default Conv2d bias init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


class ConvBNReLU(nn.Module):
  """conv3x3 (no bias, c2-xavier) + BatchNorm + ReLU: `conv`, `norm`."""
  features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    x = nn.Conv(self.features, (3, 3), padding=((1, 1), (1, 1)),
                use_bias=False, kernel_init=c2_xavier_init, dtype=self.dtype,
                param_dtype=self.param_dtype, name="conv")(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM,
                     epsilon=BN_EPS, use_fast_variance=False,
                     dtype=self.dtype, param_dtype=self.param_dtype,
                     name="norm")(x)
    return nn.relu(x)


class MaskBranch(nn.Module):
  """Mask-feature branch at stride 8.

  Attributes:
    channels: refine / tower width (`MASK_BRANCH.CHANNELS` = 128).
    out_channels: output channels (`MASK_BRANCH.OUT_CHANNELS`, 16 for
      BoxInst/BoxTeacher, 8 for fully supervised CondInst).
    num_convs: tower convs (`MASK_BRANCH.NUM_CONVS` = 4).
    dtype: computation dtype.
    param_dtype: parameter dtype.
  """
  channels: int = 128
  out_channels: int = 16
  num_convs: int = 4
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, features: Sequence[jax.Array], *,
               train: bool) -> jax.Array:
    """Computes mask features.

    Args:
      features: `[p3, p4, p5]`, each `[B, h_l, w_l, C_fpn]`, finest first;
        every level's size divides the first one's by the same integer.
      train: use batch statistics and update `batch_stats`.

    Returns:
      `[B, h_3, w_3, out_channels]` mask features (stride of the first input).
    """
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = None
    for i, feature in enumerate(features):
      refined = ConvBNReLU(self.channels, name=f"refine_{i}", **kw)(
          feature.astype(self.dtype), train=train)
      if x is None:
        x = refined
        continue
      (th, tw), (h, w) = x.shape[1:3], refined.shape[1:3]
      if th % h or tw % w or th // h != tw // w:
        raise ValueError(f"level {i} size {h}x{w} is not an integer "
                         f"downscale of {th}x{tw}")
      x = x + aligned_bilinear(refined, th // h)
    for i in range(self.num_convs):
      x = ConvBNReLU(self.channels, name=f"tower_{i}", **kw)(x, train=train)
    return nn.Conv(self.out_channels, (1, 1), padding=((0, 0), (0, 0)),
                   use_bias=True, kernel_init=torch_default_kernel_init,
                   bias_init=torch_default_bias_init(self.channels),
                   name=f"tower_{self.num_convs}", **kw)(x)
