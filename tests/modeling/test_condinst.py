"""Tests for modeling.condinst (whole network) and modeling.param_count."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from boxseg_jax.modeling import param_count
from boxseg_jax.modeling.condinst import (CondInst, num_dynamic_params,
                                          trainable_mask)
from boxseg_jax.ops.locations import fcos_locations, fpn_level_shapes

H, W = 64, 96
# A small but structurally complete CondInst (compiles fast on CPU): 2 blocks
# in res2 (projection and identity blocks), 64-wide FPN and head with 2 convs
# per tower, 32-wide mask branch with 2 tower convs.
SMALL = dict(num_classes=3, resnet_num_blocks=(2, 1, 1, 1), fpn_channels=64,
             head_num_convs=2, mask_branch_channels=32,
             mask_branch_num_convs=2)


@pytest.fixture(scope="module")
def small():
  model = CondInst(**SMALL)
  image = jax.random.normal(jax.random.key(1), (2, H, W, 3))
  # The "rbg" PRNG compiles several times faster than threefry on CPU.
  variables = jax.jit(lambda k, x: model.init(k, x, train=False))(
      jax.random.key(0, impl="rbg"), image)
  return model, variables, image


@pytest.fixture(scope="module")
def small_eval(small):
  """Eval-mode outputs of `small`, with the head's per-level outputs."""
  model, variables, image = small
  return jax.jit(lambda v, x: model.apply(
      v, x, train=False, capture_intermediates=True,
      mutable=["intermediates"]))(variables, image)


def test_num_dynamic_params_hand():
  # (16 + 2) * 8 + 8 * 8 + 8 * 1 weights, 8 + 8 + 1 biases.
  assert num_dynamic_params(16, 8, 3) == 144 + 64 + 8 + 17 == 233
  assert num_dynamic_params(8, 8, 3) == 80 + 64 + 8 + 17 == 169
  assert num_dynamic_params(16, 8, 2) == 144 + 8 + 9 == 161
  assert num_dynamic_params(16, 8, 1) == 18 + 1
  assert num_dynamic_params(16, 8, 3, rel_coords=False) == 233 - 16
  assert CondInst().num_gen_params == 233
  assert CondInst(mask_branch_out_channels=8).num_gen_params == 169


def test_outputs_shapes_and_level_order(small_eval):
  out, state = small_eval
  locs = fcos_locations(H, W)
  num_locs = locs.points.shape[0]
  assert num_locs == sum(h * w for h, w in fpn_level_shapes(H, W)) == 129
  assert {k: v.shape for k, v in out.items()} == {
      "cls_logits": (2, num_locs, 3), "reg": (2, num_locs, 4),
      "ctrness": (2, num_locs), "controller": (2, num_locs, 233),
      "mask_feats": (2, H // 8, W // 8, 16)}
  assert all(v.dtype == jnp.float32 for v in out.values())
  head = state["intermediates"]["fcos_head"]["__call__"][0]
  assert [x.shape[1:3] for x in head["cls_logits"]] == fpn_level_shapes(H, W)
  # Level-major, row-major within a level (y slowest), like fcos_locations.
  start = 0
  for level, x in enumerate(head["cls_logits"]):
    h, w = x.shape[1:3]
    sl = slice(start, start + h * w)
    np.testing.assert_array_equal(locs.levels[sl], level)
    np.testing.assert_array_equal(out["cls_logits"][:, sl],
                                  x.reshape(2, h * w, 3))
    np.testing.assert_array_equal(out["ctrness"][:, sl],
                                  head["ctrness"][level].reshape(2, h * w))
    start += h * w
  # Spot-check one location: row 1, column 2 of P3 is flat index 12 + 2.
  np.testing.assert_array_equal(locs.points[14], [2 * 8 + 4, 1 * 8 + 4])
  np.testing.assert_array_equal(out["reg"][:, 14],
                                head["reg"][0][:, 1, 2, :])
  assert float(out["reg"].min()) >= 0.0


def test_pyramid_only_is_the_heads_input(small, small_eval):
  model, variables, image = small
  pyramid = jax.jit(lambda v, x: model.apply(
      v, x, train=False, pyramid_only=True))(variables, image)
  assert sorted(pyramid) == ["p3", "p4", "p5", "p6", "p7"]
  assert [pyramid[k].shape[1:3] for k in sorted(pyramid)] == (
      fpn_level_shapes(H, W))
  # The same tensors the FCOS head reads in the full forward.
  _, state = small_eval
  head_in = state["intermediates"]["fpn"]["__call__"][0]
  for k in pyramid:
    np.testing.assert_allclose(pyramid[k], head_in[k], rtol=1e-5, atol=1e-5)


def test_frozen_gradients_and_train_step(small):
  model, variables, image = small
  params, batch_stats = variables["params"], variables["batch_stats"]
  mask = trainable_mask(params)
  labels = jax.tree.map(lambda t: "train" if t else "frozen", mask)
  tx = optax.multi_transform(
      {"train": optax.chain(optax.add_decayed_weights(1e-4),
                            optax.sgd(0.1, momentum=0.9)),
       "frozen": optax.set_to_zero()}, labels)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, batch_stats, opt_state):
    def loss(p):
      out, new = model.apply({"params": p, "batch_stats": batch_stats},
                             image, train=True, mutable=["batch_stats"])
      return sum(jnp.mean(jnp.sin(v)) for v in out.values()), new
    grads, new = jax.grad(loss, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (grads, optax.apply_updates(params, updates), new["batch_stats"],
            opt_state)

  grads, new_params, new_stats, _ = step(params, batch_stats, opt_state)
  flat_grads = traverse_util.flatten_dict(grads)
  flat_mask = traverse_util.flatten_dict(mask)
  old_flat = traverse_util.flatten_dict(params)
  new_flat = traverse_util.flatten_dict(new_params)
  num_frozen = 0
  for path, g in flat_grads.items():
    frozen = path[0] == "backbone" and (
        "norm" in path or path[1] == "stem" or path[1].startswith("res2_"))
    assert flat_mask[path] == (not frozen), path
    changed = not np.array_equal(old_flat[path], new_flat[path])
    if frozen:
      num_frozen += 1
      np.testing.assert_array_equal(g, 0.0, err_msg=str(path))
      assert not changed, path
    elif path[-1] == "kernel":
      assert np.abs(np.asarray(g)).max() > 0, path
      assert changed, path
  assert num_frozen > 0
  # FrozenBN exists past res2 too, and stays frozen there.
  assert ("backbone", "res3_0", "conv1", "norm", "scale") in flat_mask
  assert not flat_mask[("backbone", "res3_0", "conv1", "norm", "scale")]
  old_mean = batch_stats["mask_branch"]["tower_0"]["norm"]["mean"]
  new_mean = new_stats["mask_branch"]["tower_0"]["norm"]["mean"]
  assert not np.array_equal(old_mean, new_mean)


def test_bfloat16_compute(small, small_eval):
  _, variables, image = small
  out32 = small_eval[0]
  model16 = CondInst(**SMALL, dtype=jnp.bfloat16)
  out16 = jax.jit(lambda v, x: model16.apply(v, x, train=False))(
      variables, image)
  for k, v in out16.items():
    assert v.dtype == jnp.float32, k
    assert np.isfinite(np.asarray(v)).all(), k
    a, b = np.asarray(v).ravel(), np.asarray(out32[k]).ravel()
    if k != "reg":  # reg is mostly ReLU-zero at init.
      assert np.corrcoef(a, b)[0, 1] > 0.95, k
  # bf16 is really used inside: the result is not bit-identical to f32.
  assert not np.array_equal(out16["cls_logits"], out32["cls_logits"])
  v16 = jax.eval_shape(lambda k: model16.init(k, image, train=False),
                       jax.random.key(0))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(v16))


# --- parameter counts derived by hand from the architecture -----------------
# Bottleneck (in c, width b, out o): 1x1 c*b + 3x3 9*b*b + 1x1 b*o (+ c*o
# projection when c != o). FrozenBN stores 4 values per channel.
STEM = 7 * 7 * 3 * 64                                          # 9,408
RES2 = ((64 * 64 + 9 * 64 * 64 + 64 * 256 + 64 * 256)
        + 2 * (256 * 64 + 9 * 64 * 64 + 64 * 256))             # 212,992
RES3 = ((256 * 128 + 9 * 128 * 128 + 128 * 512 + 256 * 512)
        + 3 * (512 * 128 + 9 * 128 * 128 + 128 * 512))         # 1,212,416
RES4_FIRST = 512 * 256 + 9 * 256 * 256 + 256 * 1024 + 512 * 1024
RES4_OTHER = 1024 * 256 + 9 * 256 * 256 + 256 * 1024
RES5 = ((1024 * 512 + 9 * 512 * 512 + 512 * 2048 + 1024 * 2048)
        + 2 * (2048 * 512 + 9 * 512 * 512 + 512 * 2048))       # 14,942,208
# FrozenBN channels: stem 64; per block b + b + o (+ o with projection).
BN_CH_FIXED = (64 + (64 + 64 + 256 + 256) + 2 * (64 + 64 + 256)
               + (128 + 128 + 512 + 512) + 3 * (128 + 128 + 512)
               + (512 + 512 + 2048 + 2048) + 2 * (512 + 512 + 2048))
BN_CH_RES4_FIRST = 256 + 256 + 1024 + 1024
BN_CH_RES4_OTHER = 256 + 256 + 1024
# FPN: laterals 1x1 c->256 + bias; outputs and P6/P7 3x3 256->256 + bias.
FPN_COUNT = ((512 + 1024 + 2048) * 256 + 3 * 256
             + 5 * (9 * 256 * 256 + 256))                      # 3,868,672
# Head: 2 towers x 4 x (3x3 conv + bias + GN scale/bias); predictors.
def head_count(num_classes):
  towers = 2 * 4 * (9 * 256 * 256 + 256 + 2 * 256)            # 4,724,736
  cls = 9 * 256 * num_classes + num_classes
  bbox, ctr = 9 * 256 * 4 + 4, 9 * 256 * 1 + 1
  controller = 9 * 256 * 233 + 233                             # 537,065
  return towers + cls + bbox + ctr + controller + 5            # + 5 scales
# Mask branch: 3 refine (3x3 256->128, no bias, BN scale/bias), 4 tower
# (3x3 128->128, BN), 1x1 128->16 + bias; BN running stats in batch_stats.
MASK_COUNT = (3 * (9 * 256 * 128 + 2 * 128) + 4 * (9 * 128 * 128 + 2 * 128)
              + 128 * 16 + 16)                                 # 1,478,416
MASK_STATS = 7 * 2 * 128


def test_hand_arithmetic_literals():
  assert STEM == 9_408 and RES2 == 212_992 and RES3 == 1_212_416
  assert RES4_FIRST + 5 * RES4_OTHER == 7_077_888
  assert RES5 == 14_942_208
  assert STEM + RES2 + RES3 + RES4_FIRST + 5 * RES4_OTHER + RES5 == 23_454_912
  assert BN_CH_FIXED + BN_CH_RES4_FIRST + 5 * BN_CH_RES4_OTHER == 26_560
  assert FPN_COUNT == 3_868_672
  assert head_count(80) == 5_457_731
  assert MASK_COUNT == 1_478_416


@pytest.mark.parametrize("depth,res4_blocks", [(50, 6), (101, 23)])
def test_parameter_count_per_module(depth, res4_blocks):
  model = CondInst(num_classes=80, depth=depth)
  v = jax.eval_shape(lambda k: model.init(k, jnp.zeros((1, 64, 64, 3)),
                                          train=False), jax.random.key(0))
  conv = STEM + RES2 + RES3 + RES4_FIRST + (res4_blocks - 1) * RES4_OTHER + RES5
  frozen_bn = 4 * (BN_CH_FIXED + BN_CH_RES4_FIRST
                   + (res4_blocks - 1) * BN_CH_RES4_OTHER)
  counts = param_count.count_by_module(v["params"])
  assert counts == {"backbone": conv + frozen_bn, "fpn": FPN_COUNT,
                    "fcos_head": head_count(80), "mask_branch": MASK_COUNT}
  assert param_count.count_params(v["batch_stats"]) == MASK_STATS
  trainable = param_count.count_by_module(
      v["params"], mask=trainable_mask(v["params"]))
  assert trainable["backbone"] == conv - STEM - RES2
  if depth == 50:
    assert conv == 23_454_912 and frozen_bn == 106_240
    assert sum(counts.values()) == 34_365_971
  else:
    assert conv == 42_394_816 and frozen_bn == 210_688
    assert sum(counts.values()) == 53_410_323


@pytest.mark.slow
def test_r50_at_the_coco_canvas_traces_and_trains_finite():
  model = CondInst(num_classes=80, depth=50)
  # Parameter shapes do not depend on the image size: init small.
  variables = jax.jit(lambda k: model.init(k, jnp.zeros((1, 64, 64, 3)),
                                           train=False))(jax.random.key(0))
  traces = []

  @jax.jit
  def grad_step(params, batch_stats, image):
    traces.append(image.shape)  # Python side effect: runs once per trace.

    def loss(p):
      out, new = model.apply({"params": p, "batch_stats": batch_stats},
                             image, train=True, mutable=["batch_stats"])
      return sum(jnp.mean(v * v) for v in out.values()), new
    (value, new), grads = jax.value_and_grad(loss, has_aux=True)(params)
    return value, grads, new["batch_stats"]

  # Every static shape of the COCO landscape canvas (800 x 1344, batch 1):
  # tracing and lowering are where a shape error would surface.
  full = jax.ShapeDtypeStruct((1, 800, 1344, 3), jnp.float32)
  grad_step.lower(variables["params"], variables["batch_stats"], full)
  # Executed on a smaller canvas (at full size one step is minutes on 2
  # cores at the suite's -O0; its numerics are those of any size).
  image = jax.random.normal(jax.random.key(1), (1, 320, 544, 3))
  value, grads, _ = grad_step(variables["params"], variables["batch_stats"],
                              image)
  assert np.isfinite(float(value))
  assert all(np.isfinite(np.asarray(g)).all()
             for g in jax.tree.leaves(grads))
  assert traces == [full.shape, image.shape]
  g = grads["fcos_head"]["cls_logits"]["kernel"]
  assert np.abs(np.asarray(g)).max() > 0
  np.testing.assert_array_equal(grads["backbone"]["res2_2"]["conv3"]["kernel"],
                                0.0)
