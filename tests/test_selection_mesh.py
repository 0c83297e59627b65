"""Mesh-wide top-k selection: identical to one device, and cheap to exchange.

The reference is a float64 NumPy ranking (score descending, flat index
ascending); the sharded two-stage top-k must reproduce the single-device
selection bit for bit on meshes (8,1,1), (2,4,1) and (2,2,2), through
``jax.set_mesh`` and through an explicit ``mesh=``; so must the Clip-Cov and
KL-Cov selections (Clip-Cov's random choice included) and, to float32
reduction-order rounding, their losses and metrics.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxent import losses, ops
from jaxent.sharding import collective_sizes, make_mesh

B, T = 16, 12          # 8 shards -> 2 rows = 24 tokens per shard
K_MAX = 40             # > a shard's 24 tokens: every shard sends all of them
MESH_SHAPES = [(8, 1, 1), (2, 4, 1), (2, 2, 2)]
BATCH = P(("data", "fsdp"))


def np_top_k_mask(scores, valid, count, k_max):
  """Independent reference: stable rank by (-score, flat index)."""
  s = np.where(valid, scores.astype(np.float32).astype(np.float64), -np.inf).ravel()
  order = np.lexsort((np.arange(s.size), -s))
  chosen = order[:min(count, k_max)]
  out = np.zeros(s.size, bool)
  out[chosen] = valid.ravel()[chosen]
  return out.reshape(scores.shape)


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
