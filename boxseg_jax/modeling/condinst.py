"""CondInst network: ResNet + FPN + FCOS head + controller + mask branch.

The network only produces dense outputs; target assignment, the dynamic mask
head and the losses are pure functions elsewhere. Outputs are flattened over
all FPN levels in the order of `ops.locations.fcos_locations(H, W)` (P3..P7,
row-major within a level), and are float32 whatever `dtype` is.

Top-level names (see docs/model.md for the full key mapping):
`backbone` <- detectron2 `backbone.bottom_up`, `fpn` <- `backbone`,
`fcos_head` <- `proposal_generator.fcos_head` (its `controller` <- CondInst's
`controller`), `mask_branch` <- `mask_branch`.
"""

from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from boxseg_jax.modeling import resnet as resnet_lib
from boxseg_jax.modeling.fcos_head import FCOSHead
from boxseg_jax.modeling.fpn import FPN
from boxseg_jax.modeling.mask_branch import MaskBranch
from boxseg_jax.modeling.resnet import ResNet
from boxseg_jax.ops.locations import FPN_STRIDES

Dtype = Any

PYRAMID_LEVELS = ("p3", "p4", "p5", "p6", "p7")
MASK_BRANCH_LEVELS = ("p3", "p4", "p5")


def num_dynamic_params(in_channels: int = 16, channels: int = 8,
                       num_layers: int = 3, rel_coords: bool = True) -> int:
  """Size of the flat parameter vector of CondInst's dynamic mask head.

  Layers are 1x1 convs `(in_channels + 2) -> channels -> ... -> 1` (the 2 are
  the relative coordinates), each with a bias.

  Args:
    in_channels: mask-branch output channels.
    channels: hidden width of the dynamic head.
    num_layers: number of dynamic layers (>= 1).
    rel_coords: whether the relative coordinates are concatenated.

  Returns:
    Weights plus biases, e.g. 233 for (16, 8, 3) and 169 for (8, 8, 3).
  """
  if num_layers < 1:
    raise ValueError(f"num_layers must be >= 1, got {num_layers}")
  first_in = in_channels + (2 if rel_coords else 0)
  if num_layers == 1:
    return first_in + 1
  weights = first_in * channels + (num_layers - 2) * channels * channels
  weights += channels
  biases = (num_layers - 1) * channels + 1
  return weights + biases


def _flatten_levels(levels: Sequence[jax.Array]) -> jax.Array:
  """Per-level `[B, h, w, K]` -> `[B, sum(h * w), K]` float32, row-major."""
  return jnp.concatenate(
      [x.reshape(x.shape[0], -1, x.shape[-1]) for x in levels],
      axis=1).astype(jnp.float32)


class CondInst(nn.Module):
  """CondInst dense network (everything but the dynamic mask head).

  Attributes:
    num_classes: foreground classes.
    depth: ResNet depth, 50 or 101.
    fpn_channels: FPN / head width (256).
    head_num_convs: convs per FCOS tower (4).
    prior_prob: `cls_logits` bias prior (0.01).
    box_quality: "ctrness" or "iou" (same 1-channel output `ctrness`).
    mask_branch_channels: mask-branch width (128).
    mask_branch_out_channels: mask-feature channels (16 for BoxInst).
    mask_branch_num_convs: mask-branch tower convs (4).
    mask_head_channels: dynamic mask-head width (8), sizes the controller.
    mask_head_num_layers: dynamic mask-head layers (3), sizes the controller.
    stride_in_1x1: detectron2 `RESNETS.STRIDE_IN_1X1`.
    freeze_at: detectron2 `BACKBONE.FREEZE_AT`.
    resnet_num_blocks: optional blocks-per-stage override (tests and CPU
      demos trained from scratch).
    resnet_width: ResNet stem / res2 width (64 standard).
    backbone_norm: ResNet norm, "FrozenBN" (pretrained), "GN" or "BN"
      (from scratch).
    dtype: computation dtype (e.g. jnp.bfloat16); outputs are float32.
    param_dtype: parameter dtype.
  """
  num_classes: int = 80
  depth: int = 50
  fpn_channels: int = 256
  head_num_convs: int = 4
  prior_prob: float = 0.01
  box_quality: str = "ctrness"
  mask_branch_channels: int = 128
  mask_branch_out_channels: int = 16
  mask_branch_num_convs: int = 4
  mask_head_channels: int = 8
  mask_head_num_layers: int = 3
  stride_in_1x1: bool = True
  freeze_at: int = 2
  resnet_num_blocks: Optional[Sequence[int]] = None
  resnet_width: int = 64
  backbone_norm: str = "FrozenBN"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @property
  def num_gen_params(self) -> int:
    return num_dynamic_params(self.mask_branch_out_channels,
                              self.mask_head_channels,
                              self.mask_head_num_layers)

  @property
  def strides(self) -> tuple[int, ...]:
    return FPN_STRIDES

  @nn.compact
  def __call__(self, image: jax.Array, *, train: bool,
               pyramid_only: bool = False) -> dict[str, jax.Array]:
    """Runs the network.

    Args:
      image: `[B, H, W, 3]` normalised image (the caller subtracts the mean
        and divides by the std), `H, W` multiples of 32.
      train: batch statistics (and `batch_stats` updates) in the mask branch.
      pyramid_only: return the FPN levels (`{"p3": ..., "p7": ...}`, the
        computation dtype) before any head: the backbone+FPN share of the
        cost (benchmarks/train_throughput.py).

    Returns:
      With `L` = all P3..P7 locations (`fcos_locations(H, W)` order), float32:
        `cls_logits` `[B, L, num_classes]`,
        `reg` `[B, L, 4]` (l, t, r, b in stride units, ReLU'd),
        `ctrness` `[B, L]` (box-quality logit),
        `controller` `[B, L, num_gen_params]`,
        `mask_feats` `[B, H/8, W/8, mask_branch_out_channels]`.
    """
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = image.astype(self.dtype)
    features = ResNet(depth=self.depth, stride_in_1x1=self.stride_in_1x1,
                      freeze_at=self.freeze_at,
                      num_blocks=self.resnet_num_blocks,
                      width=self.resnet_width, norm=self.backbone_norm,
                      name="backbone", **kw)(x, train)
    pyramid = FPN(out_channels=self.fpn_channels, name="fpn", **kw)(features)
    if pyramid_only:
      return dict(pyramid)
    head = FCOSHead(num_classes=self.num_classes,
                    num_convs=self.head_num_convs,
                    num_levels=len(PYRAMID_LEVELS),
                    prior_prob=self.prior_prob,
                    num_gen_params=self.num_gen_params,
                    box_quality=self.box_quality, name="fcos_head", **kw)(
                        [pyramid[k] for k in PYRAMID_LEVELS])
    mask_feats = MaskBranch(channels=self.mask_branch_channels,
                            out_channels=self.mask_branch_out_channels,
                            num_convs=self.mask_branch_num_convs,
                            name="mask_branch", **kw)(
                                [pyramid[k] for k in MASK_BRANCH_LEVELS],
                                train=train)
    return {
        "cls_logits": _flatten_levels(head["cls_logits"]),
        "reg": _flatten_levels(head["reg"]),
        "ctrness": _flatten_levels(head["ctrness"])[..., 0],
        "controller": _flatten_levels(head["controller"]),
        "mask_feats": mask_feats.astype(jnp.float32),
    }


def trainable_mask(params: Mapping[str, Any],
                   freeze_at: int = 2) -> dict[str, Any]:
  """Bool tree over CondInst `params`: False for frozen backbone values.

  Args:
    params: the CondInst `params` collection.
    freeze_at: the model's `freeze_at`.

  Returns:
    Same structure, bool leaves: everything trainable except FrozenBN values
    and the stem / res2..res{freeze_at} convs (see `resnet.trainable_mask`).
    Pass it to `optax.masked` (or `multi_transform`) so weight decay and
    momentum leave those values alone.
  """
  mask = jax.tree.map(lambda _: True, dict(params))
  mask["backbone"] = resnet_lib.trainable_mask(params["backbone"], freeze_at)
  return mask
