"""FPN P3-P7 as built by AdelaiDet's `build_fcos_resnet_fpn_backbone`, NHWC.

detectron2 `FPN` with `IN_FEATURES = [res3, res4, res5]`, `NORM = ""` (convs
with bias, no norm), `FUSE_TYPE = sum`, plus `LastLevelP6P7` on P5:
P6 = conv3x3/2(P5), P7 = conv3x3/2(ReLU(P6)). Every conv uses "c2 xavier"
init (kaiming-uniform with a = 1, bias 0). Top-down: nearest x2 upsampling of
the previous merged lateral, summed with the current lateral; the 3x3 output
conv runs on the merged map.

Names follow detectron2: `fpn_lateral{k}` / `fpn_output{k}` for input stage
`res{k}`, `top_block_p6` / `top_block_p7` for `top_block.p6` / `.p7`.
"""

from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

# detectron2 `c2_xavier_fill` = kaiming_uniform_(a=1): bound sqrt(3 / fan_in).
c2_xavier_init = nn.initializers.variance_scaling(1.0, "fan_in", "uniform")


def upsample_nearest2x(x: jax.Array) -> jax.Array:
  """`[B, h, w, C]` -> `[B, 2h, 2w, C]`, torch `interpolate(scale_factor=2)`."""
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


class FPN(nn.Module):
  """Feature pyramid P3-P7 (strides 8-128) from res3-res5.

  Attributes:
    out_channels: channels of every level (`FPN.OUT_CHANNELS` = 256).
    in_features: backbone stage names, finest first.
    dtype: computation dtype.
    param_dtype: parameter dtype.
  """
  out_channels: int = 256
  in_features: Sequence[str] = ("res3", "res4", "res5")
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def _conv(self, kernel_size: int, stride: int, name: str) -> nn.Conv:
    pad = kernel_size // 2
    return nn.Conv(self.out_channels, (kernel_size, kernel_size),
                   strides=(stride, stride), padding=((pad, pad), (pad, pad)),
                   use_bias=True, kernel_init=c2_xavier_init,
                   bias_init=nn.initializers.zeros, dtype=self.dtype,
                   param_dtype=self.param_dtype, name=name)

  @nn.compact
  def __call__(self, features: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """Builds the pyramid.

    Args:
      features: `{res3: [B, H/8, W/8, C3], res4: ..., res5: [B, H/32, ...]}`.

    Returns:
      `{p3: [B, H/8, W/8, 256], ..., p5: [B, H/32, ...],
      p6: [B, ceil(H/64), ...], p7: [B, ceil(H/128), ...]}`.
    """
    stages = [int(name[3:]) for name in self.in_features]
    results = []
    prev = None
    for stage, name in reversed(list(zip(stages, self.in_features))):
      lateral = self._conv(1, 1, f"fpn_lateral{stage}")(
          features[name].astype(self.dtype))
      if prev is None:
        prev = lateral
      else:
        prev = lateral + upsample_nearest2x(prev)
      results.insert(0, self._conv(3, 1, f"fpn_output{stage}")(prev))
    out = {f"p{stage}": r for stage, r in zip(stages, results)}
    last = stages[-1]
    p6 = self._conv(3, 2, "top_block_p6")(out[f"p{last}"])
    p7 = self._conv(3, 2, "top_block_p7")(nn.relu(p6))
    out[f"p{last + 1}"] = p6
    out[f"p{last + 2}"] = p7
    return out
