"""Tests for modeling.fcos_head."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import model_ref_np as ref
from boxseg_jax.modeling.fcos_head import FCOSHead

# The "rbg" PRNG compiles much faster than threefry on CPU.
_KEY = jax.random.key(0, impl="rbg")

SHAPES = [(4, 6), (2, 3), (1, 2)]


def _inputs(rng, channels=64):
  return [rng.normal(size=(2, h, w, channels)) for h, w in SHAPES]


def _init(model, feats):
  return jax.jit(model.init)(
      _KEY, [jnp.asarray(f, jnp.float32) for f in feats])


def test_matches_reference():
  rng = np.random.default_rng(0)
  feats = _inputs(rng)
  model = FCOSHead(num_classes=3, num_convs=2, num_levels=3,
                   num_gen_params=5)
  params = _init(model, feats)["params"]
  params = jax.tree.map(
      lambda p: (np.asarray(p) + 0.05 * rng.normal(size=p.shape)).astype(
          np.float32),
      params)
  params["scales"] = jnp.asarray([1.0, -0.5, 2.0])
  got = jax.jit(model.apply)({"params": params},
                             [jnp.asarray(f, jnp.float32) for f in feats])
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)

  def conv(name, x):
    return ref.conv2d(x, p[name]["kernel"], p[name]["bias"])

  def tower(prefix, x):
    for i in range(2):
      x = conv(f"{prefix}_{2 * i}", x)
      gn = p[f"{prefix}_{2 * i + 1}"]
      x = ref.relu(ref.group_norm(x, 32, gn["scale"], gn["bias"]))
    return x

  for level, f in enumerate(feats):
    cls_x, box_x = tower("cls_tower", f), tower("bbox_tower", f)
    want = {
        "cls_logits": conv("cls_logits", cls_x),
        "reg": ref.relu(p["scales"][level] * conv("bbox_pred", box_x)),
        "ctrness": conv("ctrness", box_x),
        "controller": conv("controller", box_x),
    }
    for k, w in want.items():
      np.testing.assert_allclose(got[k][level], w, rtol=1e-4, atol=1e-4,
                                 err_msg=f"{k} level {level}")
  # The negative scale on level 1 flips signs before the ReLU.
  assert float(jnp.min(got["reg"][1])) == 0.0
  assert float(jnp.max(got["reg"][1])) > 0.0


def test_init_and_sharing():
  rng = np.random.default_rng(1)
  feats = _inputs(rng, channels=256)
  model = FCOSHead(num_classes=4, num_levels=3, num_gen_params=233)
  params = _init(model, feats)["params"]
  # One set of weights for all levels: only `scales` is per level.
  assert set(params) == (
      {f"cls_tower_{i}" for i in range(8)}
      | {f"bbox_tower_{i}" for i in range(8)}
      | {"cls_logits", "bbox_pred", "ctrness", "controller", "scales"})
  np.testing.assert_array_equal(params["scales"], [1.0, 1.0, 1.0])
  np.testing.assert_allclose(params["cls_logits"]["bias"],
                             -math.log(99.0), rtol=1e-6)
  assert abs(-math.log(99.0) - (-4.59512)) < 1e-5
  assert params["controller"]["kernel"].shape == (3, 3, 256, 233)
  for name in ("cls_tower_0", "bbox_tower_6", "bbox_pred", "ctrness",
               "controller"):
    np.testing.assert_allclose(np.std(params[name]["kernel"]), 0.01,
                               rtol=0.1, err_msg=name)
    np.testing.assert_array_equal(params[name]["bias"], 0.0)
  np.testing.assert_array_equal(params["cls_tower_1"]["scale"], 1.0)


def test_box_quality_option():
  rng = np.random.default_rng(2)
  feats = [jnp.asarray(f, jnp.float32) for f in _inputs(rng, channels=32)]
  outs = []
  for quality in ("ctrness", "iou"):
    model = FCOSHead(num_classes=2, num_convs=1, num_levels=3,
                     num_gen_params=0, box_quality=quality)
    out, v = jax.jit(model.init_with_output)(_KEY, feats)
    assert "controller" not in out and "controller" not in v["params"]
    assert [o.shape for o in out["ctrness"]] == [(2, h, w, 1)
                                                 for h, w in SHAPES]
    outs.append(out)
  np.testing.assert_array_equal(outs[0]["ctrness"][0], outs[1]["ctrness"][0])
  with pytest.raises(ValueError, match="box_quality"):
    FCOSHead(num_levels=3, box_quality="centerness").init(
        _KEY, feats)
