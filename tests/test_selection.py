"""Covariance token selection: the count, the fast top-k, and the mesh.

* The selected count equals the reference's double-precision
  ``max(1, int(ratio * N))``.
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
* Mesh-wide selection: the sharded two-stage top-k reproduces the
  single-device selection bit for bit on meshes (8,1,1), (2,4,1) and (2,2,2),
  through ``jax.set_mesh`` and through an explicit ``mesh=``; so do the
  Clip-Cov and KL-Cov selections (Clip-Cov's random choice included) and, to
  float32 reduction-order rounding, their losses and metrics; the HLO never
  gathers the token array.
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
from jaxent.sharding import collective_sizes, make_mesh

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
BIG_B, BIG_T, BIG_K_MAX = 32, 128, 40         # 4096 tokens; blocks of 32 -> 128 blocks


def make_big_case(seed, kind):
  rng = np.random.default_rng(seed)
  s = make_scores(rng, (BIG_B, BIG_T), kind)
  lens = rng.integers(0, BIG_T + 1, BIG_B)
  v = np.arange(BIG_T)[None, :] < lens[:, None]
  junk = np.array([np.nan, np.inf, -np.inf, 1e30], np.float32)
  return np.where(v, s, junk[rng.integers(0, 4, (BIG_B, BIG_T))]), v


BIG_CASES = [(0, "normal", 7), (1, "ties", 40), (2, "special", 25), (3, "ties", 10**6)]


@functools.lru_cache(maxsize=None)
def big_mask_fn():
  return jax.jit(functools.partial(ops.top_k_mask, k_max=BIG_K_MAX))


def test_top_k_mask_blocked_matches_numpy_and_plain_top_k():
  assert _select._block_size(BIG_B * BIG_T, BIG_K_MAX) > 1
  plain = jax.jit(lambda s, v, c: _select._top_k_mask_local(s, v, c, BIG_K_MAX))
  for seed, kind, count in BIG_CASES:
    s, v = make_big_case(seed, kind)
    got = np.asarray(big_mask_fn()(s, v, count))
    np.testing.assert_array_equal(got, np_top_k_mask(s, v, count, BIG_K_MAX), err_msg=kind)
    np.testing.assert_array_equal(got, np.asarray(plain(s, v, count)), err_msg=kind)
    assert got.sum() == min(count, BIG_K_MAX, v.sum())


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 2, 2)])
def test_mesh_with_blocked_shards_matches_single_device(shape):
  # 8 shards of 512 tokens, k_max 8: each shard's stage uses blocks of 32.
  k_max, rows = 8, (BIG_B * BIG_T) // 8 // BIG_T
  assert _select._block_size(rows * BIG_T, k_max) > 1
  mesh = make_mesh(*shape)
  sh = NamedSharding(mesh, BATCH)
  single = jax.jit(functools.partial(ops.top_k_mask, k_max=k_max))
  with jax.set_mesh(mesh):
    sharded = jax.jit(functools.partial(ops.top_k_mask, k_max=k_max))
    for seed, kind, count in BIG_CASES[:3]:
      s, v = make_big_case(seed, kind)
      want = np.asarray(single(s, v, min(count, k_max)))
      np.testing.assert_array_equal(want, np_top_k_mask(s, v, count, k_max))
      got = sharded(jax.device_put(s, sh), jax.device_put(v, sh), min(count, k_max))
      np.testing.assert_array_equal(np.asarray(got), want, err_msg=f"{kind} {shape}")


def test_select_kl_cov_blocked_is_the_top_covariance():
  rng = np.random.default_rng(5)
  lp = -np.abs(rng.normal(0, 1.5, (BIG_B, BIG_T))).astype(np.float32)
  adv = np.repeat(rng.normal(0, 1, (BIG_B, 1)), BIG_T, 1).astype(np.float32)
  mask = np.arange(BIG_T)[None, :] < rng.integers(BIG_T // 2, BIG_T + 1, (BIG_B, 1))
  ratio = 0.01
  k_max = ops.static_count_bound(ratio, BIG_B * BIG_T)
  assert _select._block_size(BIG_B * BIG_T, k_max) > 1
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


# ---------------------------------------------------------------- the selected count
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


# ---------------------------------------------------------------- mesh-wide selection
B, T = 16, 12          # 8 shards -> 2 rows = 24 tokens per shard
K_MAX = 40             # > a shard's 24 tokens: every shard sends all of them
MESH_SHAPES = [(8, 1, 1), (2, 4, 1), (2, 2, 2)]


def make_case(seed, *, ties=False, ragged=True):
  rng = np.random.default_rng(seed)
  if ties:  # few distinct values: most of the ranking is tie-breaking
    s = rng.integers(0, 3, (B, T)).astype(np.float32)
  else:
    s = rng.normal(size=(B, T)).astype(np.float32)
  if ragged:  # right-padded rows of random length, two rows empty
    lens = rng.integers(0, T + 1, B)
    lens[[3, 10]] = 0
    v = np.arange(T)[None, :] < lens[:, None]
  else:
    v = np.ones((B, T), bool)
  # Garbage at padding must be ignored.
  junk = np.array([np.nan, np.inf, -np.inf, 1e30], np.float32)
  s = np.where(v, s, junk[rng.integers(0, 4, (B, T))])
  return s, v


CASES = [
    # (seed, ties, ragged, count)
    (0, False, True, 7),
    (1, True, True, 30),     # ties; count > a shard's valid tokens
    (2, True, False, 40),    # all valid, count == k_max > a shard's 24 tokens
    (3, False, True, 500),   # count > all valid tokens: every valid one, capped at k_max
]


@functools.lru_cache(maxsize=None)
def mesh_of(shape):
  return make_mesh(*shape)


@functools.lru_cache(maxsize=None)
def jitted(k_max):
  return jax.jit(functools.partial(ops.top_k_mask, k_max=k_max))


def single(s, v, count, k_max=K_MAX):
  return np.asarray(jitted(k_max)(s, v, count))


def test_single_device_matches_numpy_reference():
  for seed, ties, ragged, count in CASES:
    s, v = make_case(seed, ties=ties, ragged=ragged)
    want = np_top_k_mask(s, v, count, K_MAX)
    np.testing.assert_array_equal(single(s, v, count), want)
    assert want.sum() == min(count, K_MAX, v.sum())


def test_all_equal_scores_pick_lowest_flat_indices():
  s = np.zeros((B, T), np.float32)
  v = np.ones((B, T), bool)
  v[0] = False                              # shard 0's first row is padding
  want = np.zeros(B * T, bool)
  want[T:T + 30] = True                     # then the first 30 valid, in order
  mesh = mesh_of((8, 1, 1))
  got = ops.top_k_mask(s, v, 30, k_max=K_MAX, mesh=mesh)
  np.testing.assert_array_equal(np.asarray(got).ravel(), want)


@pytest.mark.parametrize("shape", MESH_SHAPES)
def test_set_mesh_matches_single_device(shape):
  mesh = mesh_of(shape)
  sh = NamedSharding(mesh, BATCH)
  cases = [make_case(seed, ties=ties, ragged=ragged) + (count,)
           for seed, ties, ragged, count in CASES]
  want = [single(s, v, count) for s, v, count in cases]   # no mesh set here
  with jax.set_mesh(mesh):
    f = jax.jit(functools.partial(ops.top_k_mask, k_max=K_MAX))
    got = [f(jax.device_put(s, sh), jax.device_put(v, sh), count) for s, v, count in cases]
  for g, w, (seed, *_) in zip(got, want, CASES):
    # Output stays sharded over the batch axes (no gather of the mask).
    assert g.sharding.spec[0] == ("data", "fsdp"), g.sharding
    np.testing.assert_array_equal(np.asarray(g), w, err_msg=f"mesh {shape} case {seed}")


@pytest.mark.parametrize("shape", MESH_SHAPES)
def test_explicit_mesh_argument_matches_single_device(shape):
  mesh = mesh_of(shape)
  # Small k_max: each shard sends fewer candidates than it holds.
  f = jax.jit(functools.partial(ops.top_k_mask, k_max=5, mesh=mesh))
  for seed, ties, ragged, count in CASES[:2]:
    s, v = make_case(seed, ties=ties, ragged=ragged)
    got = f(s, v, count)
    np.testing.assert_array_equal(np.asarray(got), single(s, v, count, k_max=5))


def test_explicit_axis_types_mesh():
  # jax.make_mesh's default is Explicit axes; inputs sharded over T too.
  mesh = make_mesh(2, 2, 2, axis_types=jax.sharding.AxisType.Explicit)
  s, v = make_case(1, ties=True)
  want = single(s, v, 30)
  with jax.set_mesh(mesh):
    sh = NamedSharding(mesh, P(("data", "fsdp"), "tensor"))
    f = jax.jit(functools.partial(ops.top_k_mask, k_max=K_MAX))
    got = f(jax.device_put(s, sh), jax.device_put(v, sh), 30)
  np.testing.assert_array_equal(np.asarray(got), want)


def test_batch_not_divisible_names_the_numbers():
  mesh = mesh_of((2, 4, 1))
  s = np.zeros((12, 4), np.float32)
  with pytest.raises(ValueError, match=r"B=12.*8 devices.*data=2 x fsdp=4"):
    ops.top_k_mask(s, s > 0, 1, k_max=2, mesh=mesh)
  with pytest.raises(ValueError, match="valid shape"):
    ops.top_k_mask(s, s[:, :2] > 0, 1, k_max=2, mesh=mesh)


# ---- compiled program: only devices x k elements cross the mesh ----------

def test_hlo_never_gathers_the_token_array():
  bb, tt, k = 64, 128, 32                   # 8192 tokens, 8 x 32 = 256 candidates
  mesh = mesh_of((2, 2, 2))
  sh = NamedSharding(mesh, BATCH)
  args = (jax.ShapeDtypeStruct((bb, tt), jnp.float32, sharding=sh),
          jax.ShapeDtypeStruct((bb, tt), jnp.bool_, sharding=sh),
          jax.ShapeDtypeStruct((), jnp.int32))
  with jax.set_mesh(mesh):
    text = jax.jit(functools.partial(ops.top_k_mask, k_max=k)).lower(*args).compile().as_text()
    # Control: the parser does see a gather of the whole token array.
    bad = jax.jit(lambda x: x, out_shardings=NamedSharding(mesh, P()))
    bad_text = bad.lower(args[0]).compile().as_text()
  assert max(n for _, n in collective_sizes(bad_text)) >= bb * tt
  sizes = collective_sizes(text)
  assert sizes, "expected the candidate all-gather"
  # 4 batch shards (data x fsdp) x k candidates.
  assert max(n for _, n in sizes) == 4 * k, sizes
  assert all(n < bb * tt for _, n in sizes), sizes


# ---- the covariance losses on a mesh --------------------------------------

RATIO = 0.1            # ~12 of ~120 valid tokens: a real choice at this size
LOSS_KW = dict(ratio=RATIO, k_max=24)
CLIP_KW = dict(ratio=RATIO, k_max=24, cov_lb=0.2, cov_ub=4.0, clip_low=0.2, clip_high=0.2)


def loss_inputs(seed):
  rng = np.random.default_rng(seed)
  _, v = make_case(seed)
  lp = -np.abs(rng.normal(0, 1.5, (B, T))).astype(np.float32)
  old = (lp + rng.normal(0, 0.3, (B, T))).astype(np.float32)
  adv = np.repeat(rng.normal(0, 1.5, (B, 1)), T, 1).astype(np.float32)  # GRPO: one per row
  junk = np.float32(np.nan)  # padding garbage must not leak into the means
  return tuple(np.where(v, x, junk) for x in (lp, old, adv)) + (v.astype(np.float32),)


def all_losses(lp, old, adv, mask, key):
  sel_kl = losses.select_kl_cov(lp, adv, mask, **LOSS_KW)
  sel_cc = losses.select_clip_cov(lp, old, adv, mask, key=key, **CLIP_KW)
  kl = losses.kl_cov(lp, old, adv, mask, **LOSS_KW)
  cc = losses.clip_cov(lp, old, adv, mask, key=key, **CLIP_KW)
  return sel_kl, sel_cc, kl, cc


@functools.lru_cache(maxsize=None)
def single_losses(seed, key_seed):
  return jax.tree.map(np.asarray, jax.jit(all_losses)(*loss_inputs(seed),
                                                     jax.random.key(key_seed)))


@pytest.mark.parametrize("shape", MESH_SHAPES)
def test_losses_on_mesh_match_single_device(shape):
  mesh = mesh_of(shape)
  sh = NamedSharding(mesh, BATCH)
  with jax.set_mesh(mesh):
    f = jax.jit(all_losses)
    for seed, key_seed in [(0, 0), (3, 1)]:
      want = single_losses(seed, key_seed)
      args = [jax.device_put(x, sh) for x in loss_inputs(seed)]
      got = jax.tree.map(np.asarray, f(*args, jax.random.key(key_seed)))
      sel_kl, sel_cc = want[0], want[1]
      assert 0 < sel_kl.sum() and 0 < sel_cc.sum() < CLIP_KW["k_max"]
      np.testing.assert_array_equal(got[0], sel_kl)
      np.testing.assert_array_equal(got[1], sel_cc)   # same key -> same random choice
      # Losses and metrics: global sums in a different reduction order.
      for name, g, w in [("kl_cov", got[2], want[2]), ("clip_cov", got[3], want[3])]:
        # atol: a loss near 0 is a cancelling sum of O(1) terms (token-mean).
        np.testing.assert_allclose(g[0], w[0], rtol=1e-6, atol=1e-7, err_msg=name)
        assert g[1].keys() == w[1].keys()
        for m in w[1]:
          np.testing.assert_allclose(g[1][m], w[1][m], rtol=1e-6, atol=1e-7,
                                     err_msg=f"{name} {m} mesh {shape}")


def test_hlo_of_the_losses_never_gathers_the_token_array():
  # Whole programs: global means (scalar all-reduces), Clip-Cov's uniforms
  # (partitionable threefry: drawn in place), selection, loss and gradient.
  bb, tt = 64, 128
  mesh = mesh_of((2, 2, 2))
  x = jax.ShapeDtypeStruct((bb, tt), jnp.float32, sharding=NamedSharding(mesh, BATCH))

  def f(lp, old, adv, mask, key):
    cc = losses.clip_cov(lp, old, adv, mask, key=key, ratio=2e-3)
    g = jax.grad(lambda p: losses.kl_cov(p, old, adv, mask, ratio=2e-3)[0])(lp)
    return cc, g

  with jax.set_mesh(mesh):
    text = jax.jit(f).lower(x, x, x, x, jax.random.key(0)).compile().as_text()
  sizes = collective_sizes(text)
  k_max = ops.static_count_bound(2e-3, bb * tt)
  assert sizes and max(n for _, n in sizes) <= 4 * k_max, sizes
  reduces = collective_sizes(text, ops=("all-reduce",))
  assert all(n < bb * tt for _, n in reduces), reduces
