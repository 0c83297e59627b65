"""The fast paths of the covariance selections: exact, mesh-identical, uniform.

* Block-pruned top-k (``ops._select._top_k_exact``): the same values, indices
  and order as a ``lax.top_k`` of the whole array and as a NumPy stable
  ranking (score descending, flat index ascending), on sizes where blocking
  is really used, with heavy ties, ``±0``, ``±inf`` and NaN.
* ``ops.top_k_mask`` on those sizes: equal to the NumPy reference on one
  device and bit-identical to it on meshes (the per-shard stage blocked too).
* Clip-Cov's hashed ranking (``losses._covariance.token_uniforms``): equal to
  an independent NumPy uint32 re-implementation, independent of sharding,
  uniform per token (KS), and the chosen subsets uniform over keys
  (chi-square), for candidates in adjacent positions and for sequential seeds.
"""
import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P
from scipy import stats

from jaxent import losses, ops
from jaxent.losses import _covariance as cv
from jaxent.ops import _select
from jaxent.sharding import make_mesh

BATCH = P(("data", "fsdp"))


# ---------------------------------------------------------------- references
def np_canonical(scores, valid):
  """The documented order: NaN and invalid entries count as -inf, -0 == +0."""
  s = np.where(valid & ~np.isnan(scores), scores, -np.inf).astype(np.float64)
  return np.where(s == 0, 0.0, s)


def np_rank(scores, valid):
  """Flat indices ranked by (score desc, flat index asc)."""
  s = np_canonical(np.asarray(scores, np.float32), valid).ravel()
  return np.lexsort((np.arange(s.size), -s))


def np_top_k_mask(scores, valid, count, k_max):
  order = np_rank(scores, valid)[:min(count, k_max)]
  out = np.zeros(scores.size, bool)
  out[order] = valid.ravel()[order]
  return out.reshape(scores.shape)


def make_scores(rng, shape, kind):
  if kind == "normal":
    return rng.normal(size=shape).astype(np.float32)
  if kind == "ties":     # few distinct values: the ranking is mostly tie-breaking
    return rng.integers(-1, 3, shape).astype(np.float32)
  if kind == "special":  # the top ranks are +0 and -0, which must tie
    special = np.array([0.0, -0.0, -1.0, -np.inf, np.nan], np.float32)
  else:                  # "inf": +inf on top, NaN counting as -inf at the bottom
    special = np.array([np.inf, 1.0, 0.0, -0.0, np.nan], np.float32)
  return special[rng.integers(0, len(special), shape)]


@functools.lru_cache(maxsize=None)
def exact_fn(k):
  return jax.jit(lambda x: (_select._top_k_exact(x, k), lax.top_k(x, k)))


# ---------------------------------------------------------------- block-pruned top-k
@pytest.mark.parametrize("n,k", [(4096, 3), (4096, 40), (16384, 200)])
def test_block_pruned_top_k_equals_full_top_k_and_numpy(n, k):
  assert _select._block_size(n, k) > 1          # the blocked path is the one tested
  rng = np.random.default_rng(n + k)
  for kind, p_valid in [("normal", 0.8), ("ties", 0.9), ("special", 0.7), ("inf", 0.01),
                        ("ties", 0.002)]:
    x = make_scores(rng, n, kind)
    v = rng.random(n) < p_valid                  # last cases: few or fewer valid entries than k
    c = _select._canonical(jnp.asarray(x), jnp.asarray(v))
    (vals, idx), (want_vals, want_idx) = exact_fn(k)(c)
    np.testing.assert_array_equal(idx, want_idx, err_msg=kind)
    np.testing.assert_array_equal(vals, want_vals, err_msg=kind)
    np.testing.assert_array_equal(idx, np_rank(x, v)[:k], err_msg=kind)


def test_block_size_rule():
  # About sqrt(n / k), at least 32, a power of two dividing n; 1 = plain top_k.
  assert _select._block_size(1 << 20, 209) == 64
  assert _select._block_size(1 << 20, 2097) == 32
  assert _select._block_size(3 * 1024, 3) == 32
  assert _select._block_size(1000, 5) == 8       # 1000 = 8 * 125
  assert _select._block_size(999, 5) == 1        # odd: no block divides it
  assert _select._block_size(192, 40) == 1       # k * c >= n: nothing to prune


# ---------------------------------------------------------------- top_k_mask, blocked
B, T, K_MAX = 32, 128, 40         # 4096 tokens; blocks of 32 -> 128 blocks


def make_case(seed, kind):
  rng = np.random.default_rng(seed)
  s = make_scores(rng, (B, T), kind)
  lens = rng.integers(0, T + 1, B)
  v = np.arange(T)[None, :] < lens[:, None]
  junk = np.array([np.nan, np.inf, -np.inf, 1e30], np.float32)
  return np.where(v, s, junk[rng.integers(0, 4, (B, T))]), v


CASES = [(0, "normal", 7), (1, "ties", 40), (2, "special", 25), (3, "ties", 10**6)]


@functools.lru_cache(maxsize=None)
def mask_fn():
  return jax.jit(functools.partial(ops.top_k_mask, k_max=K_MAX))


def test_top_k_mask_blocked_matches_numpy_and_plain_top_k():
  assert _select._block_size(B * T, K_MAX) > 1
  plain = jax.jit(lambda s, v, c: _select._top_k_mask_local(s, v, c, K_MAX))
  for seed, kind, count in CASES:
    s, v = make_case(seed, kind)
    got = np.asarray(mask_fn()(s, v, count))
    np.testing.assert_array_equal(got, np_top_k_mask(s, v, count, K_MAX), err_msg=kind)
    np.testing.assert_array_equal(got, np.asarray(plain(s, v, count)), err_msg=kind)
    assert got.sum() == min(count, K_MAX, v.sum())


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 2, 2)])
def test_mesh_with_blocked_shards_matches_single_device(shape):
  # 8 shards of 512 tokens, k_max 8: each shard's stage uses blocks of 32.
  k_max, rows = 8, (B * T) // 8 // T
  assert _select._block_size(rows * T, k_max) > 1
  mesh = make_mesh(*shape)
  sh = NamedSharding(mesh, BATCH)
  single = jax.jit(functools.partial(ops.top_k_mask, k_max=k_max))
  with jax.set_mesh(mesh):
    sharded = jax.jit(functools.partial(ops.top_k_mask, k_max=k_max))
    for seed, kind, count in CASES[:3]:
      s, v = make_case(seed, kind)
      want = np.asarray(single(s, v, min(count, k_max)))
      np.testing.assert_array_equal(want, np_top_k_mask(s, v, count, k_max))
      got = sharded(jax.device_put(s, sh), jax.device_put(v, sh), min(count, k_max))
      np.testing.assert_array_equal(np.asarray(got), want, err_msg=f"{kind} {shape}")


def test_select_kl_cov_blocked_is_the_top_covariance():
  rng = np.random.default_rng(5)
  lp = -np.abs(rng.normal(0, 1.5, (B, T))).astype(np.float32)
  adv = np.repeat(rng.normal(0, 1, (B, 1)), T, 1).astype(np.float32)
  mask = np.arange(T)[None, :] < rng.integers(T // 2, T + 1, (B, 1))
  ratio = 0.01
  k_max = ops.static_count_bound(ratio, B * T)
  assert _select._block_size(B * T, k_max) > 1
  sel = np.asarray(jax.jit(functools.partial(losses.select_kl_cov, ratio=ratio))(lp, adv, mask))
  cov = np.asarray(losses.token_covariance(lp, adv, mask))
  count = max(1, int(ratio * mask.sum()))
  np.testing.assert_array_equal(sel, np_top_k_mask(cov, mask, count, k_max))


# ---------------------------------------------------------------- Clip-Cov's hash
def np_token_uniforms(key, shape):
  """Independent uint32 re-implementation of ``token_uniforms``."""
  s0, s1 = (np.uint32(x) for x in np.asarray(jax.random.bits(key, (2,), jnp.uint32)))

  def fmix(x):
    x = x ^ (x >> np.uint32(16))
    x = x * np.uint32(0x85EBCA6B)
    x = x ^ (x >> np.uint32(13))
    x = x * np.uint32(0xC2B2AE35)
    return x ^ (x >> np.uint32(16))

  i = np.arange(math.prod(shape), dtype=np.uint32).reshape(shape)
  with np.errstate(over="ignore"):
    h = fmix(fmix(i * np.uint32(0x9E3779B9) + s0) ^ s1)
  return h, ((h >> np.uint32(2)) + np.uint32(0x3F800000)).view(np.float32)


def test_token_uniforms_match_numpy_and_do_not_depend_on_sharding():
  key = jax.random.key(3)
  shape = (16, 64)
  h, want = np_token_uniforms(key, shape)
  got = np.asarray(jax.jit(cv.token_uniforms, static_argnums=1)(key, shape))
  np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
  assert np.unique(h).size == h.size                       # a bijection of the index
  assert np.all(np.isfinite(got)) and np.all(got >= 1)
  # Ranking by the float is ranking by the top 30 bits of the hash.
  np.testing.assert_array_equal(np.argsort(got, axis=None, kind="stable"),
                                np.argsort(h >> np.uint32(2), axis=None, kind="stable"))
  mesh = make_mesh(2, 2, 2)
  f = jax.jit(cv.token_uniforms, static_argnums=1,
              out_shardings=NamedSharding(mesh, BATCH))
  sharded = f(key, shape)
  assert len(sharded.sharding.device_set) == 8
  np.testing.assert_array_equal(np.asarray(sharded).view(np.uint32), want.view(np.uint32))


def test_token_uniforms_are_uniform_across_tokens_and_across_keys():
  shape = (32, 128)
  u = np_token_uniforms(jax.random.key(0), shape)[0].ravel() / 2.0**32
  assert stats.kstest(u, "uniform").pvalue > 1e-3
  # One token over sequential integer seeds (no split): still uniform.
  draws = jax.jit(jax.vmap(lambda s: cv.token_uniforms(jax.random.key(s), (2, 4))))(
      jnp.arange(4000))
  bits = np.asarray(draws).view(np.uint32)[:, 1, 2] - np.uint32(0x3F800000)
  assert stats.kstest(bits / 2.0**30, "uniform").pvalue > 1e-3


def test_hashed_choice_is_a_uniform_subset_of_adjacent_candidates():
  # Candidates next to each other in flat order and in one column of adjacent
  # rows: the positions a weak hash would correlate.
  shape = (4, 16)
  cand = np.zeros(shape, bool)
  cand[1, 5:9] = True            # 4 adjacent
  cand[2, 6] = cand[3, 6] = True  # same column, next rows
  n_cand, count = int(cand.sum()), 2
  k_max = 4

  @jax.jit
  def choose(seeds):
    def one(s):
      u = cv.token_uniforms(jax.random.key(s), shape)
      return ops.top_k_mask(u, jnp.asarray(cand), count, k_max=k_max)
    return jax.vmap(one)(seeds)

  n_draws = 200 * math.comb(n_cand, count)
  sel = np.asarray(choose(jnp.arange(n_draws))).reshape(n_draws, -1)   # sequential seeds
  idx = np.flatnonzero(cand.ravel())
  assert np.all(sel.sum(1) == count) and not np.any(sel[:, ~cand.ravel()])
  assert stats.chisquare(sel[:, idx].sum(0)).pvalue > 1e-4
  subsets = {s: i for i, s in enumerate(itertools.combinations(range(n_cand), count))}
  codes = [subsets[tuple(np.flatnonzero(row))] for row in sel[:, idx]]
  assert stats.chisquare(np.bincount(codes, minlength=len(subsets))).pvalue > 1e-4
