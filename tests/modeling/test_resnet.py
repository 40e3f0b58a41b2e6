"""Tests for modeling.resnet (detectron2-layout ResNet with FrozenBN)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import model_ref_np as ref
from boxseg_jax.modeling import resnet


def _frozen_bn_np(x, p, eps=1e-5):
  return (x - p["mean"]) * p["scale"] / np.sqrt(p["var"] + eps) + p["bias"]


def _random_frozen_bn(rng, c):
  return {"scale": rng.uniform(0.5, 1.5, c), "bias": rng.normal(size=c),
          "mean": rng.normal(size=c), "var": rng.uniform(0.5, 2.0, c)}


def _to_jnp(tree):
  return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), tree)


def test_frozen_bn_formula_and_identity_init():
  layer = resnet.FrozenBatchNorm()
  x = jnp.asarray([[[[1.0, 2.0]]]])
  v = layer.init(jax.random.key(0), x)
  # detectron2 init: scale 1, bias 0, mean 0, var 1 - eps -> identity.
  np.testing.assert_allclose(layer.apply(v, x), x, rtol=1e-6)
  p = {"scale": np.array([2.0, 0.5]), "bias": np.array([1.0, -1.0]),
       "mean": np.array([0.5, 4.0]), "var": np.array([3.0, 0.25])}
  got = layer.apply({"params": _to_jnp(p)}, x)
  # (1 - .5) * 2 / sqrt(3.00001) + 1 ; (2 - 4) * .5 / sqrt(.25001) - 1
  want = [0.5 * 2 / np.sqrt(3.00001) + 1, -2 * 0.5 / np.sqrt(0.25001) - 1]
  np.testing.assert_allclose(np.asarray(got)[0, 0, 0], want, rtol=1e-6)
  grads = jax.grad(lambda q, x: layer.apply({"params": q}, x).sum(),
                   argnums=(0, 1))(_to_jnp(p), x)
  for g in jax.tree.leaves(grads[0]):
    np.testing.assert_array_equal(g, 0.0)
  np.testing.assert_allclose(grads[1][0, 0, 0], [2 / np.sqrt(3.00001),
                                                 0.5 / np.sqrt(0.25001)],
                             rtol=1e-6)


def test_stem_symmetric_padding():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(1, 16, 12, 3))
  kernel = rng.normal(size=(7, 7, 3, 4)) * 0.2
  bn = _random_frozen_bn(rng, 4)
  stem = resnet.BasicStem(out_channels=4)
  params = {"conv1": {"kernel": kernel, "norm": bn}}
  got = np.asarray(stem.apply({"params": _to_jnp(params)},
                              jnp.asarray(x, jnp.float32)))
  y = ref.relu(_frozen_bn_np(ref.conv2d(x, kernel, stride=2, pad=3), bn))
  assert y.shape == (1, 8, 6, 4)
  yp = np.pad(y, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-np.inf)
  want = np.zeros((1, 4, 3, 4))
  for i in range(4):
    for j in range(3):
      want[:, i, j] = yp[:, 2 * i:2 * i + 3, 2 * j:2 * j + 3].max(axis=(1, 2))
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("stride_in_1x1", [True, False])
def test_bottleneck_matches_reference(stride_in_1x1):
  rng = np.random.default_rng(1)
  cin, b, cout = 4, 3, 8
  x = rng.normal(size=(2, 6, 4, cin))
  params = {
      "conv1": {"kernel": rng.normal(size=(1, 1, cin, b)),
                "norm": _random_frozen_bn(rng, b)},
      "conv2": {"kernel": rng.normal(size=(3, 3, b, b)) * 0.3,
                "norm": _random_frozen_bn(rng, b)},
      "conv3": {"kernel": rng.normal(size=(1, 1, b, cout)),
                "norm": _random_frozen_bn(rng, cout)},
      "shortcut": {"kernel": rng.normal(size=(1, 1, cin, cout)),
                   "norm": _random_frozen_bn(rng, cout)},
  }
  block = resnet.BottleneckBlock(cout, b, stride=2,
                                 stride_in_1x1=stride_in_1x1)
  v = block.init(jax.random.key(0), jnp.zeros(x.shape))
  shapes = jax.tree.map(jnp.shape, v["params"])
  assert shapes == jax.tree.map(np.shape, params)
  got = np.asarray(block.apply({"params": _to_jnp(params)},
                               jnp.asarray(x, jnp.float32)))

  def conv_bn(y, p, stride):
    return _frozen_bn_np(ref.conv2d(y, p["kernel"], stride=stride), p["norm"])

  s1, s3 = (2, 1) if stride_in_1x1 else (1, 2)
  y = ref.relu(conv_bn(x, params["conv1"], s1))
  y = ref.relu(conv_bn(y, params["conv2"], s3))
  y = conv_bn(y, params["conv3"], 1)
  want = ref.relu(y + conv_bn(x, params["shortcut"], 2))
  assert got.shape == (2, 3, 2, cout)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_identity_shortcut_block_has_no_projection():
  block = resnet.BottleneckBlock(8, 2, stride=1)
  v = block.init(jax.random.key(0), jnp.zeros((1, 4, 4, 8)))
  assert set(v["params"]) == {"conv1", "conv2", "conv3"}


@pytest.mark.parametrize("depth,res4_blocks", [(50, 6), (101, 23)])
def test_output_shapes_and_names(depth, res4_blocks):
  model = resnet.ResNet(depth=depth)
  out, v = jax.eval_shape(
      lambda k: model.init_with_output(k, jnp.zeros((2, 64, 96, 3))),
      jax.random.key(0))
  assert {k: x.shape for k, x in out.items()} == {
      "res3": (2, 8, 12, 512), "res4": (2, 4, 6, 1024),
      "res5": (2, 2, 3, 2048)}
  names = set(v["params"])
  assert names == ({"stem"} | {f"res2_{i}" for i in range(3)}
                   | {f"res3_{i}" for i in range(4)}
                   | {f"res4_{i}" for i in range(res4_blocks)}
                   | {f"res5_{i}" for i in range(3)})
  assert v["params"]["stem"]["conv1"]["kernel"].shape == (7, 7, 3, 64)
  assert v["params"]["res3_0"]["shortcut"]["kernel"].shape == (1, 1, 256, 512)
  assert set(v["params"]["res2_0"]["conv1"]["norm"]) == {
      "scale", "bias", "mean", "var"}


def test_bad_depth():
  with pytest.raises(ValueError):
    resnet.ResNet(depth=34).init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))


def test_freeze_at_gradients_and_mask():
  x = jax.random.normal(jax.random.key(1), (1, 64, 64, 3))
  params = jax.jit(resnet.ResNet(num_blocks=(2, 1, 1, 1)).init)(
      jax.random.key(0, impl="rbg"), x)["params"]
  for freeze_at in (0, 2):
    model = resnet.ResNet(freeze_at=freeze_at, num_blocks=(2, 1, 1, 1))

    def loss(p):
      out = model.apply({"params": p}, x)
      return sum(jnp.sum(jnp.sin(o)) for o in out.values())

    grads = traverse_util.flatten_dict(jax.jit(jax.grad(loss))(params))
    mask = traverse_util.flatten_dict(resnet.trainable_mask(params,
                                                            freeze_at))
    assert set(mask) == set(grads)
    for path, g in grads.items():
      frozen_stage = path[0] == "stem" or path[0].startswith("res2_")
      is_norm = "norm" in path
      expect_zero = is_norm or (freeze_at == 2 and frozen_stage)
      assert mask[path] == (not expect_zero), (freeze_at, path)
      if expect_zero:
        np.testing.assert_array_equal(g, 0.0, err_msg=str(path))
      else:
        assert np.abs(np.asarray(g)).max() > 0, (freeze_at, path)


@pytest.mark.parametrize("norm", ["GN", "BN"])
def test_trainable_norms_for_training_from_scratch(norm):
  model = resnet.ResNet(num_blocks=(1, 1, 1, 1), width=16, norm=norm,
                        freeze_at=0)
  x = jax.random.normal(jax.random.key(1), (2, 64, 64, 3)) * 50.0
  variables = model.init(jax.random.key(0), x)
  params = variables["params"]
  assert set(params["stem"]["conv1"]["norm"]) == {"scale", "bias"}
  # res5 of width 16: 4 * 16 * 8 = 512 channels.
  out, _ = model.apply(variables, x, train=True, mutable=["batch_stats"])
  assert out["res5"].shape == (2, 2, 2, 512)
  # Normalised activations stay O(1) even for a large input scale.
  assert float(jnp.abs(out["res5"]).mean()) < 10.0
  # GN/BN scale and bias are trainable; nothing is frozen at freeze_at=0.
  mask = resnet.trainable_mask(params, freeze_at=0)
  assert all(jax.tree.leaves(mask))
  if norm == "BN":
    assert "batch_stats" in variables


def test_unknown_norm():
  with pytest.raises(ValueError, match="norm"):
    resnet.ResNet(num_blocks=(1, 1, 1, 1), norm="LN").init(
        jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
