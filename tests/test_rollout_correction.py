"""rollout_correction: TIS, IcePop, batch normalisation and rejection masks.

Reference: hand-computed cases and a float64 NumPy re-derivation of
../shared/REFERENCE.md ("Rollout correction") on random ragged batches.
"""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxent import losses


# ---------------------------------------------------------------- NumPy reference
def np_correction(old, rollout, mask, level, threshold, rejection, batch_normalize):
  mask = np.asarray(mask, bool)
  lr = np.where(mask, np.asarray(old, np.float64) - np.asarray(rollout, np.float64), 0)
  x = np.clip(lr, -20, 20)
  n_b = mask.sum(1)
  if threshold is None:
    w = mask.astype(np.float64)
  else:
    if level == "token":
      w = np.exp(x)
    else:
      w = np.exp(np.clip(lr.sum(1), -20, 20))[:, None] * np.ones(mask.shape)
    if isinstance(threshold, tuple):
      w = np.where((w >= threshold[0]) & (w <= threshold[1]), w, 0)
    else:
      w = np.minimum(w, threshold)
    if batch_normalize:
      if level == "token":
        mean = w[mask].mean() if mask.any() else 0.0
      else:
        mean = w[n_b > 0, 0].mean() if (n_b > 0).any() else 0.0
      if mean > 1e-8:
        w = w / mean
    w = np.where(mask, w, 0)
  keep = mask.copy()
  for item in (rejection.split(",") if rejection else []):
    name, thr = item.split(":")
    bounds = [float(v) for v in thr.split("_")]
    stat, kind = name.rsplit("_", 1)
    s = {"k1": -x, "k2": x * x / 2, "k3": np.exp(x) - 1 - x}[kind]
    s = np.where(mask, s, 0)
    if stat == "seq_sum":
      s = s.sum(1, keepdims=True)
    elif stat == "seq_mean":
      s = (s.sum(1) / np.maximum(n_b, 1))[:, None]
    elif stat == "seq_max":
      s = np.array([s[b][mask[b]].max() if n_b[b] else 0.0 for b in range(len(s))])[:, None]
    if kind == "k1":
      lo = bounds[0] if len(bounds) == 2 else 1 / bounds[0]
      ok = (s >= math.log(lo)) & (s <= math.log(bounds[-1]))
    else:
      ok = s <= bounds[-1]
    keep = keep & ok
  return w, keep


def make_batch(seed, b=8, t=12, scale=0.4):
  rng = np.random.default_rng(seed)
  old = -rng.exponential(1.0, (b, t))
  rollout = old + scale * rng.normal(size=(b, t))
  lens = rng.integers(1, t + 1, b)
  lens[2] = 0
  mask = np.arange(t)[None] < lens[:, None]
  rollout[0, 0] = old[0, 0] + 30.0          # beyond the ±20 clamp
  f = lambda x: jnp.asarray(np.where(mask, x, np.nan), jnp.float32)   # NaN padding
  return f(old), f(rollout), jnp.asarray(mask)


@functools.lru_cache(maxsize=None)
def jitted(**kw):
  return jax.jit(functools.partial(losses.rollout_correction, **kw))


def run(old, rollout, mask, **kw):
  return jitted(**kw)(old, rollout, mask)


# ---------------------------------------------------------------- hand cases
def test_token_tis_and_icepop_hand_case():
  old = jnp.log(jnp.array([[0.6, 0.2, 0.5, 0.9]], jnp.float32))
  rollout = jnp.log(jnp.array([[0.2, 0.4, 0.5, 0.3]], jnp.float32))   # ratios 3, 0.5, 1, 3
  mask = jnp.array([[1, 1, 1, 0]])
  w, m = run(old, rollout, mask, threshold=2.0)
  np.testing.assert_allclose(w, [[2.0, 0.5, 1.0, 0.0]], rtol=1e-6)
  np.testing.assert_array_equal(m, [[True, True, True, False]])
  w, _ = run(old, rollout, mask, threshold=(0.6, 5.0))
  np.testing.assert_allclose(w, [[3.0, 0.0, 1.0, 0.0]], rtol=1e-6)
  w, _ = run(old, rollout, mask, threshold="0.6_5")          # the same as a string
  np.testing.assert_allclose(w, [[3.0, 0.0, 1.0, 0.0]], rtol=1e-6)
  # Batch-normalised TIS: divided by the masked mean (2 + 0.5 + 1) / 3.
  w, _ = run(old, rollout, mask, threshold=2.0, batch_normalize=True)
  np.testing.assert_allclose(w, [[2 / (3.5 / 3), 0.5 / (3.5 / 3), 1 / (3.5 / 3), 0]], rtol=1e-6)
  # No threshold: the mask as weights.
  w, _ = run(old, rollout, mask, threshold=None)
  np.testing.assert_array_equal(w, [[1, 1, 1, 0]])


def test_sequence_level_and_rejection_hand_case():
  # Row 0 ratios 3 and 0.5 (product 1.5), row 1 ratio 1.01, row 2 empty.
  old = jnp.log(jnp.array([[0.6, 0.2], [0.505, 0.1], [0.5, 0.5]], jnp.float32))
  rollout = jnp.log(jnp.array([[0.2, 0.4], [0.5, 0.9], [0.5, 0.5]], jnp.float32))
  mask = jnp.array([[1, 1], [1, 0], [0, 0]])
  w, m = run(old, rollout, mask, level="sequence", threshold=1.2)
  np.testing.assert_allclose(w, [[1.2, 1.2], [1.01, 0], [0, 0]], rtol=1e-6)
  # Geo-RS keeps a row iff its mean −log ratio lies in [log 0.999, log 1.001]: row 0's
  # mean is −log(1.5)/2, row 1's −log 1.01: both out. Seq-MIS [0.5, 2] on the sum: both in.
  _, m = run(old, rollout, mask, threshold=None, rejection="seq_mean_k1:0.999_1.001")
  np.testing.assert_array_equal(m, np.zeros((3, 2), bool))
  _, m = run(old, rollout, mask, threshold=None, rejection="seq_sum_k1:0.5_2.0")
  np.testing.assert_array_equal(m, np.asarray(mask, bool))
  # token_k2 with up = 0.5: x²/2 ≤ 0.5 iff |x| ≤ 1: drops the ratio-3 token (log 3 > 1).
  # ANDed with seq_max_k3 at 1.0: row 0's max k3 is 3 − 1 − log 3 = 0.90 -> kept.
  _, m = run(old, rollout, mask, threshold=None, rejection="token_k2:0.5, seq_max_k3:1.0")
  np.testing.assert_array_equal(m, [[False, True], [True, False], [False, False]])


# ---------------------------------------------------------------- NumPy re-derivation
CONFIGS = [
    dict(level="token", threshold=2.0, rejection=None, batch_normalize=False),
    dict(level="token", threshold=(0.5, 1.5), rejection=None, batch_normalize=True),
    dict(level="sequence", threshold=2.0, rejection=None, batch_normalize=True),
    dict(level="sequence", threshold=(0.2, 3.0), rejection="seq_mean_k1:0.9_1.1",
         batch_normalize=False),
    dict(level="token", threshold=None, rejection="token_k1:0.7_1.5,seq_max_k2:0.3",
         batch_normalize=False),
    dict(level="token", threshold=1.5, rejection="seq_sum_k3:0.8,token_k3:0.2,seq_mean_k2:2",
         batch_normalize=True),
    dict(level="token", threshold=None, rejection="seq_max_k1:1.5,seq_sum_k2:0.6,"
         "token_k1:2,seq_mean_k3:0.05,seq_sum_k1:0.3_4,seq_max_k3:0.5", batch_normalize=False),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=[str(i) for i in range(len(CONFIGS))])
def test_matches_float64_numpy(cfg):
  for seed in (0, 1):
    old, rollout, mask = make_batch(seed)
    w, m = run(old, rollout, mask, **cfg)
    w_want, m_want = np_correction(old, rollout, mask, **cfg)
    np.testing.assert_allclose(w, w_want, rtol=2e-6, atol=1e-7)
    np.testing.assert_array_equal(m, m_want)
    assert w.dtype == jnp.float32 and m.dtype == jnp.bool_
  # The configs drop some rows or tokens, and keep some.
  assert 0 < np.asarray(m).sum() <= np.asarray(mask).sum()


def test_weights_carry_no_gradient_and_masked_values_do_not_matter():
  old, rollout, mask = make_batch(3)
  cfg = CONFIGS[5]
  g = jax.jit(jax.grad(
      lambda o: jnp.sum(losses.rollout_correction(o, rollout, mask, **cfg)[0])))(old)
  np.testing.assert_array_equal(g, 0)
  w0, m0 = run(jnp.where(mask, old, 0), jnp.where(mask, rollout, 0), mask, **cfg)
  w1, m1 = run(jnp.where(mask, old, jnp.inf), jnp.where(mask, rollout, -jnp.inf), mask, **cfg)
  np.testing.assert_array_equal(w0, w1)
  np.testing.assert_array_equal(m0, m1)


def test_all_masked_batch_gives_finite_zeros():
  old, rollout, mask = make_batch(4)
  none = jnp.zeros_like(mask)
  for cfg in CONFIGS[1:4]:
    w, m = run(old, rollout, none, **cfg)
    assert np.all(np.asarray(w) == 0) and not np.any(m)


# ---------------------------------------------------------------- bad input
def test_bad_input_raises_value_error_naming_the_argument():
  x = jnp.zeros((2, 3))
  cases = [
      (dict(level="row"), r"level must be one of \['token', 'sequence'\]"),
      (dict(threshold="abc"), "threshold must be .*could not parse 'abc'"),
      (dict(threshold="1_2_3"), "threshold"),
      (dict(threshold=-1.0), "threshold"),
      (dict(threshold=(2.0, 1.0)), "threshold"),
      (dict(threshold=(1.0,)), "threshold"),
      (dict(threshold=jnp.float32(2.0)), "threshold"),
      (dict(rejection="seq_median_k1:0.5_2"), r"rejection option 'seq_median_k1' is unknown.*"
       r"seq_mean_k1"),
      (dict(rejection="seq_mean_k1"), "has no threshold"),
      (dict(rejection="seq_mean_k1:x"), "threshold of rejection option 'seq_mean_k1'"),
      (dict(rejection="token_k2:-1"), "threshold of rejection option 'token_k2'"),
      (dict(rejection=""), "rejection must be"),
      (dict(batch_normalize="yes"), "batch_normalize"),
  ]
  for kw, match in cases:
    with pytest.raises(ValueError, match=match):
      losses.rollout_correction(x, x, x, **kw)
  with pytest.raises(ValueError, match="rollout_log_prob"):
    losses.rollout_correction(x, jnp.zeros((2, 4)), x)
