"""EMA rule of BoxTeacher (§4.7): m_t = min(m, t/(t+1)), before step t."""

import jax.numpy as jnp
import numpy as np
import pytest

from boxseg_jax.train import state as state_lib


@pytest.mark.parametrize("t,expected", [(0, 0.0), (1, 0.5), (3, 0.75),
                                        (998, 0.998998998998999),
                                        (999, 0.999), (5000, 0.999)])
def test_momentum(t, expected):
  assert float(state_lib.ema_momentum(t, 0.999)) == pytest.approx(expected)


def test_running_mean_of_iterates():
  # For t < 999 the teacher equals the mean of the student iterates so far.
  ema = {"w": jnp.array(100.0)}
  students = [2.0, 4.0, 9.0, 1.0]
  for t, s in enumerate(students):
    ema = state_lib.ema_update(ema, {"w": jnp.array(s)}, t, 0.999)
    np.testing.assert_allclose(ema["w"], np.mean(students[:t + 1]),
                               rtol=1e-6)


def test_late_step_is_ema():
  ema = state_lib.ema_update({"w": jnp.array(1.0)}, {"w": jnp.array(2.0)},
                             10_000, 0.999)
  np.testing.assert_allclose(ema["w"], 0.999 * 1.0 + 0.001 * 2.0, rtol=1e-6)
