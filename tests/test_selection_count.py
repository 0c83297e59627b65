"""The selected count equals the reference's double-precision max(1, int(ratio * N))."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxent import ops

RATIOS = [2e-4, 2e-3, 0.02, 0.29, 0.2, 1 / 3, 0.7, 1.0]


@pytest.mark.parametrize("ratio", RATIOS)
def test_concrete_ratio_matches_python_double(ratio):
  max_n = 300_000
  rng = np.random.default_rng(1)
  ns = np.concatenate([rng.integers(0, max_n + 1, 2000), [0, 1, 100, 5000, 15000, max_n]])
  count = jax.jit(jax.vmap(lambda n: ops.selection_count(ratio, n, max_n=max_n)))
  got = np.asarray(count(jnp.asarray(ns, jnp.int32)))
  ref = np.array([max(1, int(ratio * int(n))) for n in ns])   # the reference's rule
  np.testing.assert_array_equal(got, ref)
  assert ops.static_count_bound(ratio, max_n) >= ref.max()


def test_known_float_traps():
  # 0.29 * 100 = 28.999999999999996 in double: the reference selects 28
  assert int(ops.selection_count(0.29, 100, max_n=1000)) == 28
  # 2e-4 is 1.99999995e-4 in float32, yet 2e-4 * 15000 = 3 in double
  assert int(ops.selection_count(2e-4, 15000, max_n=10**6)) == 3
  assert int(ops.selection_count(2e-4, 5_204_995, max_n=6_000_000)) == 1040


def test_traced_ratio_reproduces_decimal_ratios():
  """A traced (float32) ratio snaps decimal products up to the double count.

  float32 resolves the fraction of ratio*N only while the count is small
  (documented: pass a Python ratio for the exact rule at any size).
  """
  f = jax.jit(ops.selection_count)
  for ratio in (2e-4, 2e-3, 0.02, 0.1):
    for n in (15000, 5000, 1000, 123457, 2**24 + 3):
      if ratio * n > 2**16:
        continue
      assert int(f(jnp.float32(ratio), n)) == max(1, int(ratio * n)), (ratio, n)
