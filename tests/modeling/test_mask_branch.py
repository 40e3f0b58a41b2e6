"""Tests for modeling.mask_branch."""

import jax
import jax.numpy as jnp
import numpy as np

import model_ref_np as ref
from boxseg_jax.modeling.mask_branch import MaskBranch

# The "rbg" PRNG compiles much faster than threefry on CPU.
_KEY = jax.random.key(0, impl="rbg")


def _setup(seed=0, batch=2):
  rng = np.random.default_rng(seed)
  feats = [rng.normal(size=(batch, 8 >> i, 12 >> i, 6)) for i in range(3)]
  model = MaskBranch(channels=4, out_channels=3, num_convs=2)
  jfeats = [jnp.asarray(f, jnp.float32) for f in feats]
  v = jax.jit(lambda k, f: model.init(k, f, train=False))(
      _KEY, jfeats)
  params = jax.tree.map(
      lambda p: (np.asarray(p) + 0.2 * rng.normal(size=p.shape)).astype(
          np.float32), v["params"])
  return rng, feats, jfeats, model, params, v["batch_stats"]


def _reference(feats, p, stats=None):
  """Reference forward; batch statistics when `stats` is None."""
  batch_moments = {}

  def conv_bn_relu(name, x):
    y = ref.conv2d(x, p[name]["conv"]["kernel"])
    scale, bias = p[name]["norm"]["scale"], p[name]["norm"]["bias"]
    if stats is None:
      y, mean, var = ref.batch_norm_train(y, scale, bias)
      batch_moments[name] = (mean, var)
    else:
      s = stats[name]["norm"]
      y = (y - s["mean"]) / np.sqrt(s["var"] + 1e-5) * scale + bias
    return ref.relu(y)

  x = conv_bn_relu("refine_0", feats[0])
  x = x + ref.aligned_bilinear(conv_bn_relu("refine_1", feats[1]), 2)
  x = x + ref.aligned_bilinear(conv_bn_relu("refine_2", feats[2]), 4)
  x = conv_bn_relu("tower_0", x)
  x = conv_bn_relu("tower_1", x)
  out = ref.conv2d(x, p["tower_2"]["kernel"], p["tower_2"]["bias"])
  return out, batch_moments


def test_train_mode_matches_reference_and_updates_stats():
  _, feats, jfeats, model, params, stats = _setup()
  got, updates = jax.jit(
      lambda v, f: model.apply(v, f, train=True, mutable=["batch_stats"]))(
          {"params": params, "batch_stats": stats}, jfeats)
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  want, moments = _reference(feats, p)
  assert got.shape == (2, 8, 12, 3)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  new = updates["batch_stats"]
  assert set(new) == set(moments)
  for name, (mean, var) in moments.items():
    # Fresh stats are mean 0, var 1; Flax momentum 0.9 (torch 0.1), biased
    # batch variance.
    np.testing.assert_allclose(new[name]["norm"]["mean"], 0.1 * mean,
                               rtol=1e-4, atol=1e-5, err_msg=name)
    np.testing.assert_allclose(new[name]["norm"]["var"], 0.9 + 0.1 * var,
                               rtol=1e-4, atol=1e-5, err_msg=name)


def test_eval_mode_uses_running_stats():
  rng, feats, jfeats, model, params, stats = _setup(seed=1, batch=1)
  stats = jax.tree.map(
      lambda s: (np.asarray(s) + rng.uniform(0.1, 0.5, s.shape)).astype(
          np.float32), stats)
  got = jax.jit(lambda v, f: model.apply(v, f, train=False))(
      {"params": params, "batch_stats": stats}, jfeats)
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  s = jax.tree.map(lambda a: np.asarray(a, np.float64), stats)
  want, _ = _reference(feats, p, s)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_init():
  rng = np.random.default_rng(2)
  feats = [jnp.asarray(rng.normal(size=(1, 8 >> i, 8 >> i, 256)), jnp.float32)
           for i in range(3)]
  model = MaskBranch()
  v = jax.jit(lambda k, f: model.init(k, f, train=False))(
      _KEY, feats)
  params = v["params"]
  assert set(params) == {"refine_0", "refine_1", "refine_2", "tower_0",
                         "tower_1", "tower_2", "tower_3", "tower_4"}
  assert "bias" not in params["refine_0"]["conv"]
  kernel = np.asarray(params["tower_0"]["conv"]["kernel"])
  bound = np.sqrt(3.0 / (9 * 128))  # kaiming_uniform(a=1)
  assert np.abs(kernel).max() <= bound
  np.testing.assert_allclose(kernel.std(), bound / np.sqrt(3), rtol=0.05)
  last = params["tower_4"]
  assert last["kernel"].shape == (1, 1, 128, 16)
  # PyTorch default: kernel and bias ~ U(+-1/sqrt(fan_in)), fan_in 128.
  assert np.abs(last["kernel"]).max() <= 1 / np.sqrt(128)
  assert np.abs(last["bias"]).max() <= 1 / np.sqrt(128)
  assert np.abs(last["bias"]).max() > 0.2 / np.sqrt(128)
  stats = v["batch_stats"]
  np.testing.assert_array_equal(stats["tower_3"]["norm"]["mean"], 0.0)
  np.testing.assert_array_equal(stats["tower_3"]["norm"]["var"], 1.0)
