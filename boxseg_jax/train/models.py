"""Builds the network of a config (one small explicit table, no registry)."""

from typing import Any

import jax.numpy as jnp
import ml_collections

from boxseg_jax.modeling import condinst

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def build_model(config: ml_collections.ConfigDict) -> condinst.CondInst:
  m = config.model
  if m.dtype not in DTYPES:
    raise ValueError(f"model.dtype: {m.dtype!r} not one of {sorted(DTYPES)}")
  return condinst.CondInst(
      num_classes=m.num_classes, depth=m.depth,
      resnet_num_blocks=tuple(m.resnet_num_blocks) or None,
      resnet_width=m.resnet_width, backbone_norm=m.backbone_norm,
      stride_in_1x1=m.stride_in_1x1, freeze_at=m.freeze_at,
      fpn_channels=m.fpn_channels, head_num_convs=m.head_num_convs,
      prior_prob=m.prior_prob, box_quality=m.box_quality,
      mask_branch_channels=m.mask_branch_channels,
      mask_branch_out_channels=m.mask_branch_out_channels,
      mask_branch_num_convs=m.mask_branch_num_convs,
      mask_head_channels=m.mask_head_channels,
      mask_head_num_layers=m.mask_head_num_layers,
      dtype=DTYPES[m.dtype])


def trainable_mask(config: ml_collections.ConfigDict, params: Any) -> Any:
  """Bool tree over params: False for frozen backbone values."""
  return condinst.trainable_mask(params, config.model.freeze_at)
