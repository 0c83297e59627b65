"""top_entropy_mask (exact mesh-wide quantile) and adaptive_entropy.

References: ``np.quantile`` in float64 (NumPy's linear interpolation) for
the mask, on one device and on CPU meshes (8,1,1), (2,4,1), (2,2,2), with the
compiled program checked for gathers of the token array; a hand-stepped
sequence for the adaptive coefficient.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxent import losses, ops
from jaxent.ops._quantile import _float64_index
from jaxent.sharding import collective_sizes, make_mesh

B, T = 16, 12
MESH_SHAPES = [(8, 1, 1), (2, 4, 1), (2, 2, 2)]
BATCH = P(("data", "fsdp"))
RHOS = (0.2, 0.5, 0.05, 0.77, 1.0)


def np_top_entropy(h, mask, rho):
  mask = np.asarray(mask, bool)
  if not mask.any():
    return np.zeros(mask.shape, bool)
  h = np.asarray(h, np.float32).astype(np.float64)
  return mask & (h >= np.quantile(h[mask], 1 - rho))


def make_case(seed, *, ties=False):
  rng = np.random.default_rng(seed)
  if ties:   # few distinct values, zeros among them: most thresholds fall on ties
    h = rng.integers(0, 4, (B, T)) * 0.5
  else:
    h = rng.exponential(1.0, (B, T))
    h[rng.random((B, T)) < 0.1] = 0.0         # deterministic tokens: entropy exactly 0
  lens = rng.integers(0, T + 1, B)
  lens[[3, 10]] = 0
  v = np.arange(T)[None] < lens[:, None]
  junk = np.array([np.nan, np.inf, -np.inf, 1e30], np.float32)
  h = np.where(v, h, junk[rng.integers(0, 4, (B, T))]).astype(np.float32)
  return h, v


@functools.lru_cache(maxsize=None)
def jitted(rho):
  return jax.jit(functools.partial(losses.top_entropy_mask, quantile=rho))


def test_float64_index_matches_numpy():
  ms = np.concatenate([np.arange(4096), np.random.default_rng(0).integers(0, 2**31 - 1, 4096),
                       [2**31 - 1]]).astype(np.int32)
  for p in (0.8, 0.7, 1 / 3, 0.999, 0.123456789, 1e-9, 0.1 + 2**-45):
    lo, is_int, t = jax.jit(jax.vmap(lambda m, p=p: _float64_index(m, p)))(ms)
    h = ms.astype(np.float64) * p
    np.testing.assert_array_equal(lo, np.floor(h), err_msg=str(p))
    np.testing.assert_array_equal(is_int, h == np.floor(h), err_msg=str(p))
    np.testing.assert_allclose(t, h - np.floor(h), atol=1e-6, err_msg=str(p))


def test_hand_case():
  h = jnp.array([[0.1, 0.9, 0.5, 7.0], [0.3, 0.7, 0.2, 0.8]], jnp.float32)
  mask = jnp.array([[1, 1, 1, 0], [1, 1, 1, 1]])
  # Valid sorted: .1 .2 .3 .5 .7 .8 .9 (n = 7). ρ = 0.5: q at index 3 -> 0.5, keep ≥ 0.5.
  np.testing.assert_array_equal(jitted(0.5)(h, mask), [[0, 1, 1, 0], [0, 1, 0, 1]])
  # ρ = 0.25: index 6·0.75 = 4.5 -> q = 0.75: keep .8 and .9.
  np.testing.assert_array_equal(jitted(0.25)(h, mask), [[0, 1, 0, 0], [0, 0, 0, 1]])
  # ρ = 1 keeps every valid token; no valid token keeps nothing.
  np.testing.assert_array_equal(jitted(1.0)(h, mask), np.asarray(mask, bool))
  assert not np.any(jitted(0.5)(h, jnp.zeros_like(mask)))


def test_matches_numpy_quantile_on_one_device():
  for seed in range(6):
    h, v = make_case(seed, ties=seed % 2 == 1)
    for rho in RHOS:
      np.testing.assert_array_equal(jitted(rho)(h, v), np_top_entropy(h, v, rho),
                                    err_msg=f"seed {seed} rho {rho}")
  # One valid token; every token valid.
  h, _ = make_case(7)
  one = np.zeros((B, T), bool)
  one[5, 3] = True
  np.testing.assert_array_equal(jitted(0.2)(h, one), one)
  full = np.ones((B, T), bool)
  h = np.abs(h).clip(0, 5)
  h[~np.isfinite(h)] = 1.0
  for rho in RHOS:
    np.testing.assert_array_equal(jitted(rho)(h, full), np_top_entropy(h, full, rho))


def test_negative_values_and_signed_zero():
  h = np.array([[-1.5, -0.0, 0.0, 2.0, -3.0, 0.0]], np.float32)
  v = np.ones(h.shape, bool)
  for rho in (0.2, 0.5, 0.6, 0.9):
    np.testing.assert_array_equal(jitted(rho)(h, v), np_top_entropy(h, v, rho), err_msg=str(rho))


def test_tiny_index_fractions_round_like_float64():
  # level 0.1 + 2^-45 on 11 values: h = 10·level = 1 + 2.8e-13, so q = a + (b − a)·2.8e-13,
  # which float64 rounds back onto a unless b − a is large next to a's ulp (or a = 0).
  p = 0.1 + 2**-45
  f = jax.jit(lambda x, v: ops.quantile_mask(x, v, p))
  up = lambda a: float(np.nextafter(np.float32(a), np.float32(np.inf)))
  for a, b in [(0.0, 2.0), (1.0, 2.0), (1.0, up(1.0)), (-2.0, -1.0), (-1.0, up(-1.0))]:
    x = np.array([[a - 1, a, b] + [b + 1 + i for i in range(8)]], np.float32)
    v = np.ones(x.shape, bool)
    want = x >= np.quantile(x.astype(np.float64), p)
    np.testing.assert_array_equal(f(x, v), want, err_msg=f"a={a} b={b}")


@functools.lru_cache(maxsize=None)
def mesh_of(shape):
  return make_mesh(*shape)


@pytest.mark.parametrize("shape", MESH_SHAPES)
def test_mesh_gives_the_single_device_mask(shape):
  mesh = mesh_of(shape)
  sh = NamedSharding(mesh, BATCH)
  cases = [make_case(s, ties=s == 1) for s in range(3)]
  want = [np.asarray(jitted(0.2)(h, v)) for h, v in cases]
  with jax.set_mesh(mesh):
    f = jax.jit(functools.partial(losses.top_entropy_mask, quantile=0.2))
    got = [f(jax.device_put(h, sh), jax.device_put(v, sh)) for h, v in cases]
  for g, w, (h, v) in zip(got, want, cases):
    assert g.sharding.spec[0] == ("data", "fsdp"), g.sharding
    np.testing.assert_array_equal(np.asarray(g), w)
    np.testing.assert_array_equal(w, np_top_entropy(h, v, 0.2))


def test_explicit_axis_types_mesh_sharded_over_time_too():
  h, v = make_case(4)
  want = np.asarray(jitted(0.2)(h, v))
  mesh = make_mesh(2, 2, 2, axis_types=jax.sharding.AxisType.Explicit)
  with jax.set_mesh(mesh):
    sh = NamedSharding(mesh, P(("data", "fsdp"), "tensor"))
    f = jax.jit(functools.partial(losses.top_entropy_mask, quantile=0.2))
    got = f(jax.device_put(h, sh), jax.device_put(v, sh))
  np.testing.assert_array_equal(np.asarray(got), want)


def test_hlo_never_gathers_the_token_array():
  bb, tt = 64, 128
  mesh = mesh_of((2, 2, 2))
  sh = NamedSharding(mesh, BATCH)
  args = (jax.ShapeDtypeStruct((bb, tt), jnp.float32, sharding=sh),
          jax.ShapeDtypeStruct((bb, tt), jnp.bool_, sharding=sh))
  with jax.set_mesh(mesh):
    f = jax.jit(functools.partial(losses.top_entropy_mask, quantile=0.2))
    text = f.lower(*args).compile().as_text()
  # No gathering collective at all; the reductions are scalar all-reduces.
  assert collective_sizes(text) == [], collective_sizes(text)
  reduces = collective_sizes(text, ops=("all-reduce",))
  assert reduces and max(n for _, n in reduces) <= 2, reduces


# ---------------------------------------------------------------- adaptive entropy
def test_adaptive_entropy_steps_by_hand():
  init, update = losses.adaptive_entropy(0.01, target=0.2, delta=0.005, min_coef=0.0,
                                         max_coef=0.02)
  state = init()
  assert float(state.applied) == 0.0 and np.isposinf(state.last_entropy)
  update = jax.jit(update)
  applied = []
  for h in (0.5, 0.1, 0.15, 0.19, 0.3, 0.2):
    a, state = update(jnp.float32(h), state)
    applied.append(float(a))
    assert float(a) == float(state.applied)
  # c: 0.01 -> 0.005 (0.5 > target) -> 0.01 -> 0.015 -> 0.02 (cap) -> 0.015 -> 0.02 (0.2 ≤ 0.2).
  np.testing.assert_allclose(applied, [0, 0.01, 0.015, 0.02, 0, 0.02], rtol=1e-6)
  np.testing.assert_allclose(state.coef, 0.02, rtol=1e-6)
  # Never below min_coef.
  low = losses.adaptive_entropy(0.003, delta=0.005)
  _, s = jax.jit(low.update)(1.0, low.init())
  assert float(s.coef) == 0.0


def test_adaptive_entropy_resumes_bitwise():
  init, update = losses.adaptive_entropy(0.1, delta=0.0123, target=0.25)
  update = jax.jit(update)
  hs = np.random.default_rng(0).uniform(0.1, 0.4, 12).astype(np.float32)
  state = init()
  straight = []
  for h in hs:
    a, state = update(h, state)
    straight.append(np.asarray(a))
  state = init()
  for h in hs[:5]:
    _, state = update(h, state)
  saved = jax.tree.map(np.asarray, state)               # a checkpoint round trip
  state = jax.tree.map(jnp.asarray, saved)
  resumed = [np.asarray(update(h, state)[0]) for h in hs[5:6]]
  for h in hs[5:]:
    a, state = update(h, state)
    resumed.append(np.asarray(a))
  assert [x.tobytes() for x in straight[5:]] == [x.tobytes() for x in resumed[1:]]
  assert resumed[0].tobytes() == straight[5].tobytes()


# ---------------------------------------------------------------- bad input
def test_bad_input_raises_value_error_naming_the_argument():
  x = jnp.zeros((2, 3))
  cases = [
      (lambda: losses.top_entropy_mask(x, x, quantile=0.0), r"quantile must lie in \(0, 1\]"),
      (lambda: losses.top_entropy_mask(x, x, quantile=1.5), "quantile"),
      (lambda: losses.top_entropy_mask(x, x, quantile=jnp.float32(0.2)), "quantile must be a"),
      (lambda: losses.top_entropy_mask(x, jnp.zeros((2, 4)), quantile=0.2), "mask"),
      (lambda: losses.top_entropy_mask(jnp.zeros((2, 3), jnp.int32), x, quantile=0.2),
       "entropy"),
      (lambda: losses.adaptive_entropy(-0.1), "coef"),
      (lambda: losses.adaptive_entropy(0.1, delta=-0.005), "delta"),
      (lambda: losses.adaptive_entropy(0.1, min_coef=-1.0), "min_coef"),
      (lambda: losses.adaptive_entropy(0.1, min_coef=0.5, max_coef=0.2), "min_coef"),
  ]
  for fn, match in cases:
    with pytest.raises(ValueError, match=match):
      fn()
