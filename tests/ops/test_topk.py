"""ops.topk.top_k: lax.top_k's results, without its batch all-gather."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import forced_devices
from boxseg_jax.ops import topk


@pytest.mark.parametrize("k", [0, 1, 5, 12])
def test_matches_lax_top_k_with_ties(k):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.integers(0, 4, (3, 2, 12)).astype(np.float32))
  x = x.at[0, 0].set(-1.0)                    # all equal: index order
  got_v, got_i = topk.top_k(x, k)
  ref_v, ref_i = jax.lax.top_k(x, k)
  np.testing.assert_array_equal(got_i, ref_i)
  np.testing.assert_array_equal(got_v, ref_v)
  assert got_i.dtype == jnp.int32


def test_by_hand_and_bad_k():
  v, i = topk.top_k(jnp.array([0.5, 2.0, 0.5, -1.0, 2.0]), 3)
  assert i.tolist() == [1, 4, 0] and v.tolist() == [2.0, 2.0, 0.5]
  with pytest.raises(ValueError, match="k=6"):
    topk.top_k(jnp.zeros(5), 6)


SHARDED = r"""
import json
import jax, jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from boxseg_jax.ops import topk
mesh = Mesh(jax.devices(), ("data",))
s = NamedSharding(mesh, P("data"))
x = jax.device_put(jnp.arange(8 * 194.0).reshape(8, 194) % 7, s)
out = {}
for name, f in (("lax", lambda r: jax.lax.top_k(r, 16)[1]),
                ("ops", lambda r: topk.top_k(r, 16)[1])):
  fn = jax.jit(jax.vmap(f), in_shardings=s, out_shardings=s)
  hlo = fn.lower(x).compile().as_text()
  out[name] = {"all_gather": hlo.count("all-gather("),
               "idx": jax.device_get(fn(x)).tolist()}
print("RESULT " + json.dumps(out))
"""


def test_batch_sharded_selection_needs_no_all_gather():
  res = forced_devices.run(SHARDED, num_devices=4)
  assert res["ops"]["idx"] == res["lax"]["idx"]
  assert res["ops"]["all_gather"] == 0
  # What the replacement is for: lax.top_k gathers the batch (if a later
  # XLA partitions it, this documents the change and ops.topk can go).
  assert res["lax"]["all_gather"] > 0
