"""Schedule and optimizer against the reference formulas (§7)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from boxseg_jax import config as config_lib
from boxseg_jax.train import optim


def _optim_cfg(**kw):
  o = config_lib.base_config().optim
  for k, v in kw.items():
    o[k] = v
  return o


def _reference_lr(t, base=0.01, f=0.001, warm=1000, bounds=(60000, 80000),
                  gamma=0.1):
  # lr(t) = base * gamma^{#boundaries <= t} * (f + (1 - f) t / warm), t < warm
  lr = base * gamma ** sum(b <= t for b in bounds)
  if t < warm:
    lr *= f + (1 - f) * t / warm
  return lr


@pytest.mark.parametrize("t", [0, 1, 500, 999, 1000, 59999, 60000, 79999,
                               80000, 89999])
def test_schedule_matches_detectron2(t):
  sched = optim.make_schedule(_optim_cfg())
  # optax evaluates linear_schedule in float32 as (init - end)(1 - frac) +
  # end, which cancels to ~1.3e-5 relative error near t = 0.
  assert float(sched(t)) == pytest.approx(_reference_lr(t), rel=1e-4)


def test_schedule_hand_values():
  sched = optim.make_schedule(_optim_cfg())
  assert float(sched(0)) == pytest.approx(1e-5, rel=1e-4)  # 0.01 * 0.001
  # 0.01 * (0.001 + 0.999 / 2)
  assert float(sched(500)) == pytest.approx(0.005005, rel=1e-4)
  assert float(sched(70000)) == pytest.approx(0.001, rel=1e-6)


def _params():
  return {"conv": {"kernel": jnp.ones((2,)), "bias": jnp.ones((2,))},
          "gn": {"scale": jnp.ones((2,)), "bias": jnp.ones((2,))},
          "frozen": {"kernel": jnp.ones((2,))}}


def _trainable():
  return {"conv": {"kernel": True, "bias": True},
          "gn": {"scale": True, "bias": True}, "frozen": {"kernel": False}}


def test_first_sgd_step_and_weight_decay_policy():
  # Warm-up off, lr 0.1, wd 0.5 on conv params only (weight_decay_norm 0):
  # update = -lr * (g + wd * p) = -0.1 * (1 + 0.5) = -0.15 on conv,
  # -0.1 * 1 = -0.1 on the GroupNorm params, 0 on the frozen kernel.
  o = _optim_cfg(base_lr=0.1, warmup_steps=0, weight_decay=0.5,
                 weight_decay_norm=0.0)
  tx, _ = optim.make_optimizer(o, _trainable())
  params = _params()
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(updates["conv"]["kernel"], -0.15, rtol=1e-6)
  np.testing.assert_allclose(updates["gn"]["scale"], -0.1, rtol=1e-6)
  np.testing.assert_allclose(updates["frozen"]["kernel"], 0.0)
  # BoxTeacher policy (weight_decay_norm < 0): norm params decay too.
  o.weight_decay_norm = -1.0
  tx, _ = optim.make_optimizer(o, _trainable())
  updates, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(updates["gn"]["scale"], -0.15, rtol=1e-6)


def test_momentum_second_step():
  # PyTorch SGD: buf = m buf + g; p -= lr buf. Two steps of g = 1, m = 0.9:
  # updates -lr * 1 then -lr * 1.9.
  o = _optim_cfg(base_lr=0.1, warmup_steps=0, weight_decay=0.0)
  tx, _ = optim.make_optimizer(o, _trainable())
  params = _params()
  grads = jax.tree.map(jnp.ones_like, params)
  state = tx.init(params)
  _, state = tx.update(grads, state, params)
  updates, _ = tx.update(grads, state, params)
  np.testing.assert_allclose(updates["conv"]["bias"], -0.19, rtol=1e-6)


def test_per_param_clipping_differs_from_global():
  o = _optim_cfg(base_lr=1.0, warmup_steps=0, weight_decay=0.0,
                 momentum=0.0, clip_type="per_param", clip_value=1.0)
  tx, _ = optim.make_optimizer(o, _trainable())
  params = _params()
  grads = jax.tree.map(jnp.zeros_like, params)
  grads["conv"]["kernel"] = jnp.array([3.0, 4.0])  # norm 5 -> scaled to 1
  grads["gn"]["bias"] = jnp.array([0.3, 0.4])      # norm 0.5 -> unchanged
  updates, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(updates["conv"]["kernel"], [-0.6, -0.8],
                             rtol=1e-5)
  np.testing.assert_allclose(updates["gn"]["bias"], [-0.3, -0.4], rtol=1e-5)


def test_norm_param_mask():
  mask = optim.norm_param_mask(_params())
  assert mask["gn"]["scale"] and mask["gn"]["bias"]
  assert not mask["conv"]["bias"] and not mask["frozen"]["kernel"]


def test_unknown_clip_type():
  with pytest.raises(ValueError, match="optim.clip_type"):
    optim.make_optimizer(_optim_cfg(clip_type="nope"), _trainable())


def test_adamw_first_step():
  # Adam's first step is lr * g / (|g| + eps) = lr * sign(g); decoupled decay
  # adds lr * wd * p: -0.1 * (1 + 0.5 * 1) = -0.15 (conv), -0.1 (GN, wd 0).
  o = _optim_cfg(name="adamw", base_lr=0.1, warmup_steps=0, weight_decay=0.5,
                 weight_decay_norm=0.0)
  tx, _ = optim.make_optimizer(o, _trainable())
  params = _params()
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(updates["conv"]["kernel"], -0.15, rtol=1e-5)
  np.testing.assert_allclose(updates["gn"]["scale"], -0.1, rtol=1e-5)
  np.testing.assert_allclose(updates["frozen"]["kernel"], 0.0)
