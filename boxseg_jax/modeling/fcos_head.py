"""FCOS head shared across FPN levels, with CondInst's controller, NHWC.

AdelaiDet `FCOSHead`: a classification tower and a box tower, each
`num_convs` x [conv3x3 + GroupNorm(32, eps 1e-5) + ReLU]; `cls_logits` on the
cls tower; `bbox_pred` (regression, `ReLU(scale_l * x)` in stride units),
`ctrness` (box-quality logit) and CondInst's `controller` (dynamic mask-head
parameters) on the box tower. All convs ~ N(0, 0.01^2), bias 0, except the
`cls_logits` bias = -log((1 - pi) / pi).

Names follow the PyTorch `nn.Sequential` indices: `cls_tower_{2i}` is the i-th
conv and `cls_tower_{2i+1}` its GroupNorm (`cls_tower.{2i}` /
`cls_tower.{2i+1}` in AdelaiDet); `scales[l]` holds `scales.{l}.scale`.
"""

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

BOX_QUALITY_OPTIONS = ("ctrness", "iou")
GN_EPS = 1e-5
head_init = nn.initializers.normal(stddev=0.01)


class FCOSHead(nn.Module):
  """Shared FCOS head (+ controller) applied to every pyramid level.

  Attributes:
    num_classes: foreground classes `C` (sigmoid outputs, no background).
    num_convs: convs per tower (`NUM_CLS_CONVS = NUM_BOX_CONVS = 4`).
    num_levels: number of pyramid levels (one learnable scale each).
    prior_prob: focal-loss prior for the `cls_logits` bias.
    num_gen_params: controller outputs per location (233 for a 16-channel
      mask branch); 0 builds no controller.
    box_quality: "ctrness" or "iou". Both use the same 1-channel output
      (`ctrness`); the name only tells the loss what it is trained against.
    gn_groups: GroupNorm groups.
    dtype: computation dtype.
    param_dtype: parameter dtype.
  """
  num_classes: int = 80
  num_convs: int = 4
  num_levels: int = 5
  prior_prob: float = 0.01
  num_gen_params: int = 233
  box_quality: str = "ctrness"
  gn_groups: int = 32
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def _conv(self, features: int, name: str, bias_init=nn.initializers.zeros):
    return nn.Conv(features, (3, 3), strides=(1, 1),
                   padding=((1, 1), (1, 1)), use_bias=True,
                   kernel_init=head_init, bias_init=bias_init,
                   dtype=self.dtype, param_dtype=self.param_dtype, name=name)

  def _tower(self, prefix: str, channels: int):
    layers = []
    for i in range(self.num_convs):
      conv = self._conv(channels, f"{prefix}_{2 * i}")
      norm = nn.GroupNorm(num_groups=self.gn_groups, epsilon=GN_EPS,
                          use_fast_variance=False, dtype=self.dtype,
                          param_dtype=self.param_dtype,
                          name=f"{prefix}_{2 * i + 1}")
      layers.append((conv, norm))
    return layers

  @nn.compact
  def __call__(self, features: Sequence[jax.Array]) -> dict[str, list]:
    """Applies the head to each level.

    Args:
      features: `num_levels` arrays `[B, h_l, w_l, C_fpn]`, finest first.

    Returns:
      Dict of per-level lists:
        `cls_logits` `[B, h_l, w_l, num_classes]`,
        `reg` `[B, h_l, w_l, 4]` (l, t, r, b in stride units, >= 0),
        `ctrness` `[B, h_l, w_l, 1]` (logit),
        `controller` `[B, h_l, w_l, num_gen_params]` (only if > 0).
    """
    if self.box_quality not in BOX_QUALITY_OPTIONS:
      raise ValueError(f"box_quality must be one of {BOX_QUALITY_OPTIONS}, "
                       f"got {self.box_quality!r}")
    if len(features) != self.num_levels:
      raise ValueError(f"expected {self.num_levels} levels, "
                       f"got {len(features)}")
    channels = features[0].shape[-1]
    # Built once and applied to every level: the head is shared.
    cls_tower = self._tower("cls_tower", channels)
    bbox_tower = self._tower("bbox_tower", channels)
    bias_value = -math.log((1.0 - self.prior_prob) / self.prior_prob)
    cls_logits = self._conv(self.num_classes, "cls_logits",
                            nn.initializers.constant(bias_value))
    bbox_pred = self._conv(4, "bbox_pred")
    ctrness = self._conv(1, "ctrness")
    controller = (self._conv(self.num_gen_params, "controller")
                  if self.num_gen_params > 0 else None)
    scales = self.param("scales", nn.initializers.ones, (self.num_levels,),
                        self.param_dtype)

    out = {"cls_logits": [], "reg": [], "ctrness": []}
    if controller is not None:
      out["controller"] = []
    for level, feature in enumerate(features):
      x = feature.astype(self.dtype)
      cls_x, box_x = x, x
      for conv, norm in cls_tower:
        cls_x = nn.relu(norm(conv(cls_x)))
      for conv, norm in bbox_tower:
        box_x = nn.relu(norm(conv(box_x)))
      out["cls_logits"].append(cls_logits(cls_x))
      reg = bbox_pred(box_x) * scales[level].astype(self.dtype)
      out["reg"].append(nn.relu(reg))
      out["ctrness"].append(ctrness(box_x))
      if controller is not None:
        out["controller"].append(controller(box_x))
    return out
