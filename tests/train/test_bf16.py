"""bf16 compute (``model.dtype=bfloat16``): params, gradients, losses and
optimizer state stay float32; every convolution of the train step, forward
and backward, runs in bf16; the losses agree with float32 on one batch.

configs/tiny.py, one batch; the HLO is read from the lowered (portable)
StableHLO of the whole train step, not XLA:CPU's compiled form (the CPU
backend upcasts bf16 convolutions itself).
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from boxseg_jax import config_helpers
from boxseg_jax.data import features
from boxseg_jax.losses import condinst as condinst_losses
from boxseg_jax.train import loop
from boxseg_jax.train import step as step_lib


def _setup(dtype):
  c = config_helpers.load_config_file("tiny", **{"model.dtype": dtype})
  mesh = step_lib.make_mesh(1)
  model, tx, schedule = loop.build_model_and_optimizer(c)
  state = loop.init_state(c, model, tx, mesh)
  _, it = loop.make_train_input(c)
  batch = {k: jnp.asarray(v) for k, v in
           features.device_batch(next(it)).items()}
  return c, model, tx, schedule, state, batch


@pytest.fixture(scope="module")
def both():
  return {d: _setup(d) for d in ("float32", "bfloat16")}


def _losses(c, model, state, batch):
  terms = step_lib.METHODS[c.method].mask_terms(c)
  kwargs = step_lib.loss_kwargs(c)

  def fn(params):
    outputs, _ = model.apply(
        {"params": params, "batch_stats": state.batch_stats},
        step_lib.normalize_image(batch["image"], c.model), train=True,
        mutable=["batch_stats"])
    _, aux = condinst_losses.condinst_losses(
        outputs, None, batch, mask_terms=terms, step=state.step + 1000,
        rng=jax.random.PRNGKey(0), **kwargs)
    return aux

  return {k: float(v) for k, v in jax.jit(fn)(state.params).items()
          if k.startswith("loss")}


def test_params_are_float32_and_the_same_in_both(both):
  s32, s16 = both["float32"][4], both["bfloat16"][4]
  for a, b in zip(jax.tree.leaves((s32.params, s32.opt_state)),
                  jax.tree.leaves((s16.params, s16.opt_state))):
    assert b.dtype == a.dtype
    if jnp.issubdtype(a.dtype, jnp.floating):
      assert a.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_losses_agree_with_float32(both):
  got = {d: _losses(v[0], v[1], v[4], v[5]) for d, v in both.items()}
  assert set(got["float32"]) == set(got["bfloat16"])
  assert {"loss_fcos_cls", "loss_prj", "loss_pairwise"} <= set(
      got["float32"])
  for k, ref in got["float32"].items():
    # bf16 has an 8-bit mantissa (relative step 2^-8 = 0.4%); the losses
    # are sums over many activations, computed in float32.
    assert got["bfloat16"][k] == pytest.approx(ref, rel=2e-2, abs=1e-4), k
  assert got["bfloat16"] != got["float32"]  # bf16 really ran


def _types(pattern, text):
  return [m.split("x")[-1].rstrip(">") for m in re.findall(pattern, text)]


def test_every_convolution_of_the_step_is_bf16(both):
  c, model, tx, schedule, state, batch = both["bfloat16"]
  step = jax.jit(step_lib.make_train_step(model, tx, schedule, c))
  text = step.lower(state, batch).as_text()
  conv = r"stablehlo.convolution.*?->\s*(tensor<[^>]*>)"
  types = _types(conv, text)
  # Forward and backward (input and weight gradients) of every conv.
  assert len(types) > 100 and set(types) == {"bf16"}
  # The only float32 matrix products left are the dynamic mask head's
  # per-instance einsums (ops/dynamic_mask_head.py: small, and their
  # output feeds the float32 mask losses); the float32 step has as many.
  dots16 = _types(r"stablehlo.dot_general.*?->\s*(tensor<[^>]*>)", text)
  c32, model32, tx32, sched32, state32, batch32 = both["float32"]
  text32 = jax.jit(step_lib.make_train_step(
      model32, tx32, sched32, c32)).lower(state32, batch32).as_text()
  assert set(_types(conv, text32)) == {"f32"}
  dots32 = _types(r"stablehlo.dot_general.*?->\s*(tensor<[^>]*>)", text32)
  assert len(dots16) == len(dots32)
