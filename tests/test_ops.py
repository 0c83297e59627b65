"""ops: masked reductions, aggregation modes, chunked log-probs and entropy.

References are independent float64 NumPy re-derivations of the formulas in
REFERENCE.md; gradients are checked by finite differences in x64 mode.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from jaxent import ops

MODES = ops.AGG_MODES


# ---------------------------------------------------------------- references
def np_aggregate(loss, mask, mode, max_len=None):
  """REFERENCE.md 'Aggregation', in float64 over explicit Python loops."""
  loss = np.asarray(loss, np.float64)
  mask = np.asarray(mask, bool)
  if mode == "token-mean":
    n = mask.sum()
    return float(loss[mask].sum() / n) if n else 0.0
  if mode == "seq-mean-token-sum-norm":
    return float(loss[mask].sum() / (max_len or loss.shape[1]))
  rows = []
  for b in range(loss.shape[0]):
    vals = loss[b][mask[b]]
    if len(vals):
      rows.append(vals.sum() if mode == "seq-mean-token-sum" else vals.mean())
  return float(np.mean(rows)) if rows else 0.0


def np_log_softmax(z):
  z = np.asarray(z, np.float64)
  m = z.max(-1, keepdims=True)
  return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))


def np_entropy(z):
  logp = np_log_softmax(z)
  p = np.exp(logp)
  return -np.where(p > 0, p * np.where(p > 0, logp, 0), 0).sum(-1)


def _random_loss_and_mask(rng, b=6, t=7):
  x = rng.normal(size=(b, t)).astype(np.float32)
  lens = rng.integers(1, t + 1, size=b)
  lens[2] = 0  # an empty row
  mask = np.arange(t)[None] < lens[:, None]
  return x, mask


# ---------------------------------------------------------------- masked ops
def test_masked_sum_and_mean_ignore_nan_and_inf_in_values_and_grads():
  rng = np.random.default_rng(0)
  x, mask = _random_loss_and_mask(rng)
  x_bad = np.where(mask, x, np.nan).astype(np.float32)
  x_bad[~mask & (np.arange(7)[None] % 2 == 0)] = np.inf

  @jax.jit
  def f(x, mask):
    return ops.masked_sum(x, mask), ops.masked_mean(x, mask), ops.masked_mean(x, mask, axis=1)

  s, m, row = f(x_bad, mask)
  np.testing.assert_allclose(s, x[mask].astype(np.float64).sum(), rtol=1e-6)
  np.testing.assert_allclose(m, x[mask].astype(np.float64).mean(), rtol=1e-6)
  want_rows = [x[b][mask[b]].mean() if mask[b].any() else 0.0 for b in range(x.shape[0])]
  np.testing.assert_allclose(row, want_rows, rtol=1e-6)
  loss = lambda x: ops.masked_mean(x, mask) + ops.masked_mean(x, mask, axis=1).sum()
  g = jax.jit(jax.grad(loss))(x_bad)
  assert np.all(np.isfinite(g))
  assert np.all(np.asarray(g)[~mask] == 0)


def test_centered_products_match_float64_numpy_and_ignore_masked_nan_and_inf():
  # The means are sums of x·m (the mask as float32), redone as selects only
  # when that sum is not finite: a masked NaN or inf must give the same bits
  # as clean padding, and valid values that overflow must stay inf.
  rng = np.random.default_rng(3)
  lp = (-rng.exponential(1.5, (8, 33))).astype(np.float32)
  a = np.repeat(rng.normal(size=(8, 1)), 33, axis=1).astype(np.float32)
  mask = np.arange(33)[None] < rng.integers(0, 34, size=(8, 1))
  f = jax.jit(ops.centered_products)
  cov, n = f(lp, a, mask)
  lp64, a64 = lp.astype(np.float64), a.astype(np.float64)
  want = (a64 - a64[mask].mean()) * (lp64 - lp64[mask].mean()) * mask
  np.testing.assert_allclose(cov, want, rtol=2e-5, atol=1e-6)
  assert int(n) == mask.sum()
  for bad_lp, bad_a in [(np.nan, np.inf), (-np.inf, np.nan), (np.inf, -np.inf)]:
    got, got_n = f(np.where(mask, lp, bad_lp), np.where(mask, a, bad_a), mask)
    np.testing.assert_array_equal(got, cov)
    assert int(got_n) == int(n)
  big = np.where(mask, np.float32(3e38), 0).astype(np.float32)
  over, _ = f(lp, big, mask)               # Σ A overflows: inf mean, as a select sum gives
  sel_sum = jnp.sum(jnp.where(mask, big, 0))
  assert not np.isfinite(float(sel_sum))
  assert not np.all(np.isfinite(np.asarray(over)[mask]))
  # The product detour (and its cond, a host round trip on XLA:GPU) is for
  # XLA:CPU only: the GPU and TPU programs sum selects.
  for platform, detour in (("cpu", True), ("cuda", False), ("tpu", False)):
    text = jax.export.export(f, platforms=[platform])(lp, a, mask).mlir_module()
    assert ("optimization_barrier" in text) == detour, platform


# ---------------------------------------------------------------- aggregate
@functools.partial(jax.jit, static_argnames=("with_norm",))
def _all_modes(x, mask, num_tokens, num_seqs, max_len, with_norm=True):
  """Each mode's value and gradient; one compile for all modes."""
  out = {}
  for mode in MODES:
    kw = dict(num_tokens=num_tokens, num_seqs=num_seqs, max_len=max_len) if with_norm else {}
    out[mode] = jax.value_and_grad(lambda x: ops.aggregate(x, mask, mode, **kw))(x)
  return out


@pytest.mark.parametrize("axis,keepdims", [(None, False), (-1, False), (1, True), (0, False),
                                           ((0, 2), False), ((0, 1, 2), True)])
def test_count_valid_equals_numpy_count(axis, keepdims):
  rng = np.random.default_rng(0)
  m = rng.random((3, 5, 7)) < 0.6
  got = jax.jit(functools.partial(ops.count_valid, axis=axis, keepdims=keepdims))(m)
  want = np.sum(m, axis=axis, keepdims=keepdims)
  assert got.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(got), want)
  # A float mask counts its nonzero entries (nonzero = valid), as the losses do.
  w = np.where(m, rng.uniform(0.1, 2.0, m.shape), 0.0).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(ops.count_valid(w, axis=axis, keepdims=keepdims)), want)


def test_aggregate_modes_match_numpy_and_hand_case():
  # Hand case: rows [1, 2, (3)], [4, (5), (6)], all masked; T = 3.
  x = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]], np.float32)
  mask = np.array([[1, 1, 0], [1, 0, 0], [0, 0, 0]], np.int32)
  got = _all_modes(x, mask, None, None, None, with_norm=False)
  want = {"token-mean": 7 / 3, "seq-mean-token-sum": (3 + 4) / 2,
          "seq-mean-token-mean": (1.5 + 4) / 2, "seq-mean-token-sum-norm": 7 / 3}
  for mode in MODES:
    np.testing.assert_allclose(got[mode][0], want[mode], rtol=1e-6)
  rng = np.random.default_rng(1)
  x, mask = _random_loss_and_mask(rng, 6, 7)
  got = _all_modes(x, mask, None, None, None, with_norm=False)
  for mode in MODES:
    np.testing.assert_allclose(got[mode][0], np_aggregate(x, mask, mode), rtol=1e-5)
    assert np.all(np.asarray(got[mode][1])[~mask] == 0)


def test_aggregate_all_masked_is_zero_with_finite_grads():
  x = np.full((3, 4), np.nan, np.float32)
  got = _all_modes(x, np.zeros((3, 4), bool), None, None, None, with_norm=False)
  for mode in MODES:
    loss, g = got[mode]
    assert float(loss) == 0.0
    assert np.all(np.asarray(g) == 0)


def test_aggregate_micro_batch_normalizers_sum_to_full_batch():
  rng = np.random.default_rng(2)
  x, mask = _random_loss_and_mask(rng, 6, 7)
  full = _all_modes(x, mask, None, None, None, with_norm=False)
  n_tok = jnp.asarray(mask.sum(), jnp.float32)
  n_seq = jnp.asarray(mask.any(1).sum(), jnp.float32)
  parts = [_all_modes(x[s], mask[s], n_tok, n_seq, 7.0) for s in (slice(0, 3), slice(3, 6))]
  for mode in MODES:
    np.testing.assert_allclose(sum(p[mode][0] for p in parts), full[mode][0], rtol=1e-5)
    g = np.concatenate([np.asarray(p[mode][1]) for p in parts])
    np.testing.assert_allclose(g, full[mode][1], rtol=1e-5, atol=1e-7)


def test_aggregate_grads_finite_difference():
  rng = np.random.default_rng(3)
  x, mask = _random_loss_and_mask(rng, 4, 5)
  with jax.enable_x64(True):
    for mode in MODES:
      check_grads(jax.jit(lambda x: ops.aggregate(x, mask, mode)), (x.astype(np.float64),),
                  order=1, modes=["rev"])


def test_aggregate_bad_input():
  x = jnp.zeros((2, 3))
  with pytest.raises(ValueError, match=r"agg must be one of .*token-mean.*seq-mean-token-sum-norm"):
    ops.aggregate(x, x, "mean")
  with pytest.raises(ValueError, match="mask has shape"):
    ops.aggregate(x, jnp.zeros((2, 4)))
  with pytest.raises(ValueError, match="per_token must be"):
    ops.aggregate(jnp.zeros(3), jnp.zeros(3))
  with pytest.raises(ValueError, match="num_tokens"):
    ops.aggregate(x, x, num_tokens=-1.0)
  with pytest.raises(ValueError, match="max_len"):
    ops.aggregate(x, x, "seq-mean-token-sum-norm", max_len=0)


# ---------------------------------------------------------------- entropy/log-probs
def test_entropy_from_logits_matches_numpy_with_banned_tokens():
  rng = np.random.default_rng(4)
  z = (3 * rng.normal(size=(3, 5, 11))).astype(np.float32)
  z[0, 0, :4] = -np.inf  # banned vocabulary entries
  h = jax.jit(ops.entropy_from_logits)(jnp.asarray(z, jnp.bfloat16).astype(jnp.float32))
  np.testing.assert_allclose(h, np_entropy(z), rtol=2e-2, atol=2e-2)  # bf16 round trip above
  h = jax.jit(ops.entropy_from_logits)(z)
  np.testing.assert_allclose(h, np_entropy(z), rtol=1e-5, atol=1e-6)
  assert h.dtype == jnp.float32
  g = jax.jit(jax.grad(lambda z: ops.entropy_from_logits(z).sum()))(z)
  assert np.all(np.isfinite(g)) and np.all(np.asarray(g)[0, 0, :4] == 0)


@functools.partial(jax.jit, static_argnames=("chunk_size",))
def _lp_ent_logits(logits, tokens, temperature, w, chunk_size):
  def f(logits):
    lp, ent = ops.logprobs_and_entropy(logits, tokens, temperature=temperature,
                                       chunk_size=chunk_size)
    return jnp.sum(w[0] * lp + w[1] * ent), (lp, ent)
  return jax.value_and_grad(f, has_aux=True)(logits)


def _naive_lp_ent(z, tokens, temperature):
  """Unchunked JAX float32 reference for gradients."""
  z = z.astype(jnp.float32) / temperature
  logp = jax.nn.log_softmax(z)
  lp = jnp.take_along_axis(logp, tokens[..., None], -1)[..., 0]
  ent = -jnp.sum(jnp.exp(logp) * logp, -1)
  return lp, ent


def test_logprobs_and_entropy_from_logits_match_numpy_and_unchunked_grads():
  rng = np.random.default_rng(5)
  b, t, v = 2, 7, 13
  z = (2 * rng.normal(size=(b, t, v))).astype(np.float32)
  tok = rng.integers(0, v, size=(b, t)).astype(np.int32)
  w = rng.normal(size=(2, b, t)).astype(np.float32)
  temp = 0.7
  (_, (lp, ent)), g = _lp_ent_logits(z, tok, temp, w, 3)  # 3 chunks, last one padded
  logp = np_log_softmax(z.astype(np.float64) / temp)
  np.testing.assert_allclose(lp, np.take_along_axis(logp, tok[..., None], -1)[..., 0],
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(ent, np_entropy(z.astype(np.float64) / temp), rtol=1e-5, atol=1e-5)
  assert lp.dtype == ent.dtype == jnp.float32

  def naive(z):
    lp, ent = _naive_lp_ent(z, tok, temp)
    return jnp.sum(w[0] * lp + w[1] * ent)
  np.testing.assert_allclose(g, jax.jit(jax.grad(naive))(z), rtol=1e-4, atol=1e-6)
  # A new temperature is a traced value: no recompile.
  _lp_ent_logits(z, tok, 1.3, w, 3)
  assert _lp_ent_logits._cache_size() == 1


def test_logprobs_and_entropy_from_hidden_and_head():
  rng = np.random.default_rng(6)
  b, t, d, v = 2, 5, 4, 9
  h = rng.normal(size=(b, t, d)).astype(np.float32)
  k = rng.normal(size=(d, v)).astype(np.float32)
  tok = rng.integers(0, v, size=(b, t)).astype(np.int32)

  @jax.jit
  def f(h, k):
    def loss(h, k):
      lp, ent = ops.logprobs_and_entropy(ops.HiddenAndHead(h, k), tok, chunk_size=2)
      return jnp.sum(lp) + 0.5 * jnp.sum(ent), (lp, ent)
    return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(h, k)

  (_, (lp, ent)), (gh, gk) = f(h, k)
  z = np.einsum("btd,dv->btv", h.astype(np.float64), k)
  np.testing.assert_allclose(lp, np.take_along_axis(np_log_softmax(z), tok[..., None], -1)[..., 0],
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(ent, np_entropy(z), rtol=1e-5, atol=1e-5)

  def naive(h, k):
    lp, ent = _naive_lp_ent(jnp.einsum("btd,dv->btv", h, k), tok, 1.0)
    return jnp.sum(lp) + 0.5 * jnp.sum(ent)
  nh, nk = jax.jit(jax.grad(naive, argnums=(0, 1)))(h, k)
  np.testing.assert_allclose(gh, nh, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(gk, nk, rtol=1e-4, atol=1e-5)


def test_logprobs_grads_finite_difference_x64():
  rng = np.random.default_rng(7)
  tok = rng.integers(0, 6, size=(2, 3))
  with jax.enable_x64(True):
    z = rng.normal(size=(2, 3, 6))

    def f(z):
      lp, ent = ops.logprobs_and_entropy(z, tok, temperature=0.9, chunk_size=2)
      return jnp.sum(lp * jnp.arange(1.0, 4.0)) + jnp.sum(ent)
    check_grads(jax.jit(f), (z,), order=1, modes=["rev"])


def _big_arrays(jaxpr, limit, dtype=None):
  """(shape, dtype) of every value in ``jaxpr`` (recursively) with >= limit elements."""
  found = []

  def visit(jx):
    for eqn in jx.eqns:
      for var in eqn.outvars:
        aval = var.aval
        if hasattr(aval, "shape") and np.prod(aval.shape, dtype=np.int64) >= limit:
          if dtype is None or aval.dtype == dtype:
            found.append((aval.shape, aval.dtype, eqn.primitive.name))
      for sub in _subjaxprs(eqn):
        visit(sub)
  visit(jaxpr.jaxpr)
  return found


def _subjaxprs(eqn):
  for p in eqn.params.values():
    for q in (p if isinstance(p, (tuple, list)) else (p,)):
      if hasattr(q, "jaxpr") and hasattr(q, "consts"):  # ClosedJaxpr
        yield q.jaxpr
      elif hasattr(q, "eqns"):  # Jaxpr
        yield q


def test_no_full_float32_logits_in_forward_or_backward():
  b, t, d, v, c = 2, 64, 8, 512, 16
  tok = jnp.zeros((b, t), jnp.int32)

  def loss_head(h, k):
    lp, ent = ops.logprobs_and_entropy(ops.HiddenAndHead(h, k), tok, chunk_size=c)
    return jnp.sum(lp) + jnp.sum(ent)

  jx = jax.make_jaxpr(jax.grad(loss_head, argnums=(0, 1)))(
      jnp.zeros((b, t, d), jnp.bfloat16), jnp.zeros((d, v), jnp.bfloat16))
  # Not even low-precision [B, T, V] logits: nothing beyond ~one chunk's size.
  assert _big_arrays(jx, 2 * b * c * v) == []

  def loss_logits(z):
    lp, ent = ops.logprobs_and_entropy(z, tok, chunk_size=c)
    return jnp.sum(lp) + jnp.sum(ent)

  jx = jax.make_jaxpr(jax.grad(loss_logits))(jnp.zeros((b, t, v), jnp.bfloat16))
  assert _big_arrays(jx, 2 * b * c * v, jnp.float32) == []
  assert _big_arrays(jx, b * c * v, jnp.float32) != []  # the chunk itself is float32


def test_logprobs_bad_input():
  z = jnp.zeros((2, 3, 5))
  with pytest.raises(ValueError, match="tokens has shape"):
    ops.logprobs_and_entropy(z, jnp.zeros((2, 4), jnp.int32))
  with pytest.raises(ValueError, match="temperature"):
    ops.logprobs_and_entropy(z, jnp.zeros((2, 3), jnp.int32), temperature=0.0)
  with pytest.raises(ValueError, match="kernel"):
    ops.logprobs_and_entropy(ops.HiddenAndHead(jnp.zeros((2, 3, 4)), jnp.zeros((5, 7))),
                             jnp.zeros((2, 3), jnp.int32))
  with pytest.raises(ValueError, match="chunk_size"):
    ops.logprobs_and_entropy(z, jnp.zeros((2, 3), jnp.int32), chunk_size=0)
  with pytest.raises(ValueError, match="logits must be"):
    ops.logprobs_and_entropy(jnp.zeros((2, 3)), jnp.zeros((2, 3), jnp.int32))
