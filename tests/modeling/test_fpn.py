"""Tests for modeling.fpn."""

import jax
import jax.numpy as jnp
import numpy as np

import model_ref_np as ref
from boxseg_jax.modeling.fpn import FPN

# The "rbg" PRNG compiles much faster than threefry on CPU.
_KEY = jax.random.key(0, impl="rbg")


def _features(rng, batch, h3, w3, channels=(3, 5, 6)):
  return {f"res{k}": rng.normal(size=(batch, h3 >> i, w3 >> i, c))
          for i, (k, c) in enumerate(zip((3, 4, 5), channels))}


def test_matches_reference_with_ceil_levels():
  rng = np.random.default_rng(0)
  # res5 3x3 -> P6 2x2 -> P7 1x1 (ceil).
  feats = _features(rng, 2, 12, 12)
  model = FPN(out_channels=4)
  jfeats = {k: jnp.asarray(v, jnp.float32) for k, v in feats.items()}
  params = model.init(_KEY, jfeats)["params"]
  # Random non-zero biases so that bias handling is checked too.
  params = jax.tree.map(
      lambda p: (np.asarray(p) + 0.1 * rng.normal(size=p.shape)).astype(
          np.float32),
      params)
  got = model.apply({"params": params}, jfeats)
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)

  def conv(name, x, stride=1):
    return ref.conv2d(x, p[name]["kernel"], p[name]["bias"], stride=stride)

  lat5 = conv("fpn_lateral5", feats["res5"])
  p5 = conv("fpn_output5", lat5)
  lat4 = conv("fpn_lateral4", feats["res4"]) + ref.upsample_nearest2x(lat5)
  p4 = conv("fpn_output4", lat4)
  lat3 = conv("fpn_lateral3", feats["res3"]) + ref.upsample_nearest2x(lat4)
  p3 = conv("fpn_output3", lat3)
  p6 = conv("top_block_p6", p5, stride=2)
  p7 = conv("top_block_p7", ref.relu(p6), stride=2)
  want = {"p3": p3, "p4": p4, "p5": p5, "p6": p6, "p7": p7}
  assert set(got) == set(want)
  for k in want:
    assert got[k].shape == want[k].shape, k
    np.testing.assert_allclose(got[k], want[k], rtol=1e-4, atol=1e-4,
                               err_msg=k)
  assert [got[k].shape[1] for k in ("p3", "p4", "p5", "p6", "p7")] == [
      12, 6, 3, 2, 1]


def test_init_c2_xavier():
  rng = np.random.default_rng(1)
  feats = {k: jnp.asarray(v, jnp.float32)
           for k, v in _features(rng, 1, 32, 32, (512, 1024, 2048)).items()}
  params = jax.jit(FPN().init)(_KEY, feats)["params"]
  for name, layer in params.items():
    np.testing.assert_array_equal(layer["bias"], 0.0)
    kernel = np.asarray(layer["kernel"])
    fan_in = np.prod(kernel.shape[:3])
    bound = np.sqrt(3.0 / fan_in)  # kaiming_uniform(a=1): gain 1
    assert np.abs(kernel).max() <= bound, name
    # Uniform(-b, b) has std b / sqrt(3).
    np.testing.assert_allclose(kernel.std(), bound / np.sqrt(3), rtol=0.05,
                               err_msg=name)
