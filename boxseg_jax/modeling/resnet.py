"""ResNet-50/101 backbone in detectron2's layout, NHWC.

detectron2 `build_resnet_backbone` with `NORM = FrozenBN`, `DEPTH in {50, 101}`,
`STRIDE_IN_1X1` configurable (True for MSRA weights) and `FREEZE_AT` stages
frozen. Parameter names follow detectron2 so that a converter can map keys
one-to-one (see docs/model.md):

  stem/conv1/kernel              <- backbone.bottom_up.stem.conv1.weight
  stem/conv1/norm/{scale,bias,mean,var}
                                 <- ...stem.conv1.norm.{weight,bias,
                                    running_mean,running_var}
  res{k}_{i}/conv{1,2,3}/...     <- ...res{k}.{i}.conv{1,2,3}.*
  res{k}_{i}/shortcut/...        <- ...res{k}.{i}.shortcut.*

FrozenBN values are stored in `params` (so one pytree carries everything a
converter writes), are wrapped in `stop_gradient`, and are never touched by a
correctly masked optimizer: `trainable_mask` lists them, and the frozen stages,
as not trainable.
"""

from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

Dtype = Any

# Blocks per stage res2..res5.
RESNET_BLOCKS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
FROZEN_BN_EPS = 1e-5

# detectron2 `c2_msra_fill`: kaiming normal, fan_out, ReLU gain.
c2_msra_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def _frozen_var_init(key, shape, dtype=jnp.float32):
  del key
  # detectron2 FrozenBatchNorm2d starts at running_var = 1 - eps, so the
  # freshly built layer is the identity.
  return jnp.full(shape, 1.0 - FROZEN_BN_EPS, dtype)


class FrozenBatchNorm(nn.Module):
  """Per-channel affine from frozen BatchNorm statistics.

  `y = (x - mean) * scale / sqrt(var + eps) + bias`; all four vectors are
  `stop_gradient`ed and nothing is ever written back.
  """
  eps: float = FROZEN_BN_EPS
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,), self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (c,), self.param_dtype)
    mean = self.param("mean", nn.initializers.zeros, (c,), self.param_dtype)
    var = self.param("var", _frozen_var_init, (c,), self.param_dtype)
    scale, bias, mean, var = jax.lax.stop_gradient(
        (scale, bias, mean, var))
    mult = scale.astype(jnp.float32) * jax.lax.rsqrt(
        var.astype(jnp.float32) + self.eps)
    shift = bias.astype(jnp.float32) - mean.astype(jnp.float32) * mult
    return (x.astype(self.dtype) * mult.astype(self.dtype)
            + shift.astype(self.dtype))


NORMS = ("FrozenBN", "GN", "BN")
GN_GROUPS = 32
BN_MOMENTUM = 0.9  # torch momentum 0.1


class ConvNorm(nn.Module):
  """detectron2 `Conv2d(bias=False, norm=NORM)`: `kernel` + `norm/*`.

  `norm` is detectron2's `RESNETS.NORM`: "FrozenBN" (pretrained weights),
  "GN" (GroupNorm, min(32, C) groups) or "BN" (BatchNorm with batch
  statistics in training; `batch_stats` collection) for training from
  scratch. Padding is explicit and symmetric (`k // 2` on each side, as
  PyTorch), which differs from Flax "SAME" for stride-2 convs on even inputs.
  """
  features: int
  kernel_size: int
  stride: int = 1
  norm: str = "FrozenBN"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    k = self.kernel_size
    kernel = self.param("kernel", c2_msra_init,
                        (k, k, x.shape[-1], self.features), self.param_dtype)
    pad = k // 2
    y = jax.lax.conv_general_dilated(
        x.astype(self.dtype), kernel.astype(self.dtype),
        window_strides=(self.stride, self.stride),
        padding=((pad, pad), (pad, pad)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    if self.norm == "FrozenBN":
      return FrozenBatchNorm(dtype=self.dtype, param_dtype=self.param_dtype,
                             name="norm")(y)
    if self.norm == "GN":
      return nn.GroupNorm(num_groups=min(GN_GROUPS, self.features),
                          epsilon=FROZEN_BN_EPS, use_fast_variance=False,
                          dtype=self.dtype, param_dtype=self.param_dtype,
                          name="norm")(y)
    if self.norm == "BN":
      return nn.BatchNorm(use_running_average=not train,
                          momentum=BN_MOMENTUM, epsilon=FROZEN_BN_EPS,
                          use_fast_variance=False, dtype=self.dtype,
                          param_dtype=self.param_dtype, name="norm")(y)
    raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")


class BasicStem(nn.Module):
  """7x7/2 conv (pad 3) + FrozenBN + ReLU + 3x3/2 max-pool (pad 1)."""
  out_channels: int = 64
  norm: str = "FrozenBN"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    x = ConvNorm(self.out_channels, 7, stride=2, norm=self.norm,
                 dtype=self.dtype, param_dtype=self.param_dtype,
                 name="conv1")(x, train)
    x = nn.relu(x)
    # Padded with -inf like torch's max_pool2d.
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


class BottleneckBlock(nn.Module):
  """detectron2 `BottleneckBlock` (groups 1, dilation 1).

  With `stride_in_1x1` (MSRA weights) the stride sits in `conv1` (1x1),
  otherwise in `conv2` (3x3). A projection `shortcut` (1x1 conv + FrozenBN,
  with the block's stride) exists iff the channel count changes.
  """
  out_channels: int
  bottleneck_channels: int
  stride: int = 1
  stride_in_1x1: bool = True
  norm: str = "FrozenBN"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    kw = dict(norm=self.norm, dtype=self.dtype, param_dtype=self.param_dtype)
    if x.shape[-1] != self.out_channels:
      shortcut = ConvNorm(self.out_channels, 1, stride=self.stride,
                          name="shortcut", **kw)(x, train)
    else:
      shortcut = x.astype(self.dtype)
    stride_1x1, stride_3x3 = ((self.stride, 1) if self.stride_in_1x1
                              else (1, self.stride))
    y = ConvNorm(self.bottleneck_channels, 1, stride=stride_1x1,
                 name="conv1", **kw)(x, train)
    y = nn.relu(y)
    y = ConvNorm(self.bottleneck_channels, 3, stride=stride_3x3,
                 name="conv2", **kw)(y, train)
    y = nn.relu(y)
    y = ConvNorm(self.out_channels, 1, name="conv3", **kw)(y, train)
    return nn.relu(y + shortcut)


class ResNet(nn.Module):
  """detectron2 ResNet with FrozenBN; returns the requested stage outputs.

  Attributes:
    depth: 50 or 101 (selects the blocks per stage).
    stride_in_1x1: detectron2 `RESNETS.STRIDE_IN_1X1` (True for MSRA weights,
      False for torchvision-style weights).
    freeze_at: detectron2 `BACKBONE.FREEZE_AT`: 0 nothing, 1 the stem, k >= 2
      the stem and res2..res{k}. Implemented by `stop_gradient` on the output
      of the last frozen stage, so their parameters get exactly zero gradient.
    out_features: stage names to return, from `res2`..`res5`.
    num_blocks: optional override of the blocks per stage (res2..res5); None
      uses `RESNET_BLOCKS[depth]`.
    width: stem / res2 bottleneck channels (64 standard; smaller widths
      scale every stage, for CPU demos trained from scratch).
    norm: "FrozenBN" (default, pretrained weights), "GN" or "BN" (training
      from scratch, where an identity FrozenBN would leave a deep ResNet
      without any normalisation).
    dtype: computation dtype.
    param_dtype: parameter dtype.
  """
  depth: int = 50
  stride_in_1x1: bool = True
  freeze_at: int = 2
  out_features: Sequence[str] = ("res3", "res4", "res5")
  num_blocks: Optional[Sequence[int]] = None
  width: int = 64
  norm: str = "FrozenBN"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False
               ) -> dict[str, jax.Array]:
    """Runs the backbone.

    Args:
      x: `[B, H, W, 3]` normalised image, `H, W` multiples of 32.
      train: batch statistics for `norm="BN"` (no effect otherwise).

    Returns:
      `{name: [B, H / s, W / s, C]}` for `out_features` (res3: s 8, C 512;
      res4: 16, 1024; res5: 32, 2048).
    """
    if self.num_blocks is not None:
      blocks = tuple(self.num_blocks)
    elif self.depth in RESNET_BLOCKS:
      blocks = RESNET_BLOCKS[self.depth]
    else:
      raise ValueError(f"depth must be one of {sorted(RESNET_BLOCKS)}, "
                       f"got {self.depth}")
    if len(blocks) != 4:
      raise ValueError(f"num_blocks needs 4 stages, got {blocks}")
    if self.norm not in NORMS:
      raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")
    kw = dict(norm=self.norm, dtype=self.dtype, param_dtype=self.param_dtype)
    x = BasicStem(out_channels=self.width, name="stem", **kw)(
        x.astype(self.dtype), train)
    if self.freeze_at >= 1:
      x = jax.lax.stop_gradient(x)
    outputs = {}
    out_channels, bottleneck_channels = 4 * self.width, self.width
    for stage, num in enumerate(blocks, start=2):
      for i in range(num):
        x = BottleneckBlock(
            out_channels, bottleneck_channels,
            stride=2 if (i == 0 and stage > 2) else 1,
            stride_in_1x1=self.stride_in_1x1,
            name=f"res{stage}_{i}", **kw)(x, train)
      if self.freeze_at >= stage:
        x = jax.lax.stop_gradient(x)
      name = f"res{stage}"
      if name in self.out_features:
        outputs[name] = x
      out_channels *= 2
      bottleneck_channels *= 2
    return outputs


def _is_frozen(path: Sequence[str], freeze_at: int,
               frozen_bn: set) -> bool:
  if tuple(path[:-1]) in frozen_bn:  # FrozenBN values in every stage.
    return True
  top = path[0]
  if top == "stem":
    return freeze_at >= 1
  if top.startswith("res"):
    stage = int(top[3:].split("_")[0])
    return freeze_at >= stage
  raise ValueError(f"unexpected ResNet parameter path {'/'.join(path)}")


def trainable_mask(params: Mapping[str, Any],
                   freeze_at: int = 2) -> dict[str, Any]:
  """Which ResNet parameters an optimizer may update.

  Args:
    params: the `ResNet` parameter tree (the `backbone` subtree of CondInst).
    freeze_at: the model's `freeze_at`.

  Returns:
    A tree of the same structure with bool leaves: False for every FrozenBN
    value and for the stem / res2..res{freeze_at} convs (which also get zero
    gradient), True otherwise. Use it with `optax.masked` so that weight decay
    and momentum never move frozen values, as detectron2 leaves them out of
    its optimizer.
  """
  flat = traverse_util.flatten_dict(params)
  # FrozenBN modules are the `norm`s holding running statistics in `params`
  # (GN has only scale/bias there; BN keeps its statistics in batch_stats).
  frozen_bn = {p[:-1] for p in flat if p[-1] == "var" and "norm" in p}
  mask = {path: not _is_frozen(path, freeze_at, frozen_bn) for path in flat}
  return traverse_util.unflatten_dict(mask)
