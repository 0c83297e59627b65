"""GSPO, CISPO, GMPO and the importance ``weights`` of every policy loss.

References: hand-computed cases, and a float64 NumPy re-derivation of each
loss, its gradient and its metrics from ../shared/REFERENCE.md ("Policy-loss
families of the field") on random ragged batches.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxent import losses, ops

MODES = ops.AGG_MODES


# ---------------------------------------------------------------- NumPy references
def np_agg_weights(mask, mode):
  """d(aggregate)/d(per-token loss) for each valid token."""
  mask = np.asarray(mask, bool)
  n_b = mask.sum(1, keepdims=True)
  rows = max(int(mask.any(1).sum()), 1)
  if mode == "token-mean":
    w = np.full(mask.shape, 1 / max(mask.sum(), 1))
  elif mode == "seq-mean-token-sum":
    w = np.full(mask.shape, 1 / rows)
  elif mode == "seq-mean-token-mean":
    w = 1 / (rows * np.maximum(n_b, 1)) * np.ones(mask.shape)
  else:
    w = np.full(mask.shape, 1 / mask.shape[1])
  return np.where(mask, w, 0)


def f64(*xs):
  return [np.asarray(x, np.float64) for x in xs]


def np_mean(x, mask):
  mask = np.asarray(mask, bool)
  return float(np.asarray(x, np.float64)[mask].mean()) if mask.any() else 0.0


def np_gspo(lp, old, a, mask, cl, ch, mode, w=None):
  lp, old, a = f64(lp, old, a)
  mask = np.asarray(mask, bool)
  w = np.ones(mask.shape) if w is None else np.asarray(w, np.float64)
  diff = np.where(mask, lp - old, 0)
  log_s = diff.sum(1, keepdims=True) / np.maximum(mask.sum(1, keepdims=True), 1)
  capped = log_s <= 10
  s = np.exp(np.minimum(log_s, 10)) * np.ones(mask.shape)
  l1, l2 = -a * s, -a * np.clip(s, 1 - cl, 1 + ch)
  per = np.maximum(l1, l2) * w
  grad = np.where((l1 >= l2) & capped, -a * s, 0) * w
  aw = np_agg_weights(mask, mode)
  return ((aw * np.where(mask, per, 0)).sum(), aw * grad,
          {"clipfrac": np_mean(l2 > l1, mask), "approx_kl": np_mean(-diff, mask)})


def np_cispo(lp, old, a, mask, cl, ch, mode, w=None):
  lp, old, a = f64(lp, old, a)
  mask = np.asarray(mask, bool)
  w = np.ones(mask.shape) if w is None else np.asarray(w, np.float64)
  d = np.clip(np.where(mask, lp - old, 0), -20, 20)
  r = np.exp(d)
  cr = np.clip(r, 1 - cl, 1 + ch)
  per = -cr * a * lp * w
  aw = np_agg_weights(mask, mode)
  return ((aw * np.where(mask, per, 0)).sum(), aw * (-cr * a * w),
          {"clipfrac": np_mean(r != cr, mask), "approx_kl": np_mean(-d, mask)})


def np_gmpo(lp, old, a, mask, cl, ch, w=None):
  lp, old, a = f64(lp, old, a)
  mask = np.asarray(mask, bool)
  b = mask.shape[0]
  n_b = mask.sum(1)
  d = np.where(mask, lp - old, 0)
  a = np.where(mask, a, 0)
  c = np.clip(d, -cl, ch)
  sg = np.sign(a)
  d_min = sg * np.minimum(sg * d, sg * c)
  active = (sg != 0) & (sg * d <= sg * c)
  nn = np.maximum(n_b, 1)
  ratio = np.exp(np.where(mask, d_min, 0).sum(1) / nn)
  abar = a.sum(1) / nn
  seq_w = np.ones(b)
  if w is not None:
    w = np.asarray(w, np.float64)
    seq_w = np.exp(np.where(mask, np.log(np.where(mask, w, 1) + 1e-10), 0).sum(1) / nn)
  rows = -abar * ratio * seq_w
  grad = np.where(mask & active, (-abar * ratio * seq_w / nn)[:, None], 0) / b
  clipped = d != c
  return (rows.sum() / b, grad,
          {"clipfrac": np_mean(clipped & (a > 0), mask),
           "clipfrac_lower": np_mean(clipped & (a < 0), mask),
           "approx_kl": np_mean(-d, mask)})


# ---------------------------------------------------------------- inputs
def make_batch(seed, b=6, t=16, drift=0.3):
  rng = np.random.default_rng(seed)
  lp = -rng.exponential(1.5, size=(b, t))
  old = lp + drift * rng.normal(size=(b, t))
  a = rng.normal(size=(b, 1)) + 0.3 * rng.normal(size=(b, t))
  a[3] = 0.0                      # a zero-advantage row (GMPO's sign(A) = 0)
  lens = rng.integers(t // 3, t + 1, size=b)
  lens[1] = 0                     # an empty response
  mask = np.arange(t)[None] < lens[:, None]
  old[0, 0] = lp[0, 0] - 25.0     # beyond CISPO's ±20 clamp
  w = rng.uniform(0.2, 2.0, size=(b, t))
  f = lambda x: jnp.asarray(x, jnp.float32)
  return f(lp), f(old), f(a), jnp.asarray(mask), f(w)


GSPO_KW = dict(clip_low=0.02, clip_high=0.03)     # wider than the paper's: some clip, some not
CISPO_KW = dict(clip_low=0.2, clip_high=0.28)
GMPO_KW = dict(clip_low=0.2, clip_high=0.3)


@functools.partial(jax.jit, static_argnames=("weighted",))
def run_all(lp, old, a, mask, w, weighted=False):
  """Value, grad and metrics of the new losses (every mode) for one batch."""
  ww = w if weighted else None
  out = {}
  for mode in MODES:
    for name, fn, kw in (("gspo", losses.gspo, GSPO_KW), ("cispo", losses.cispo, CISPO_KW)):
      f = lambda lp, fn=fn, kw=kw, mode=mode: fn(lp, old, a, mask, agg=mode, weights=ww, **kw)
      (loss, m), g = jax.value_and_grad(f, has_aux=True)(lp)
      out[name, mode] = (loss, g, m)
  f = lambda lp: losses.gmpo(lp, old, a, mask, weights=ww, **GMPO_KW)
  (loss, m), g = jax.value_and_grad(f, has_aux=True)(lp)
  out["gmpo", None] = (loss, g, m)
  return out


def expected(lp, old, a, mask, w, weighted):
  ww = np.asarray(w) if weighted else None
  out = {}
  for mode in MODES:
    out["gspo", mode] = np_gspo(lp, old, a, mask, GSPO_KW["clip_low"], GSPO_KW["clip_high"],
                                mode, ww)
    out["cispo", mode] = np_cispo(lp, old, a, mask, CISPO_KW["clip_low"], CISPO_KW["clip_high"],
                                  mode, ww)
  out["gmpo", None] = np_gmpo(lp, old, a, mask, GMPO_KW["clip_low"], GMPO_KW["clip_high"], ww)
  return out


@pytest.fixture(scope="module")
def batch():
  return make_batch(0)


@pytest.fixture(scope="module")
def result(batch):
  return {weighted: run_all(*batch, weighted=weighted) for weighted in (False, True)}


# ---------------------------------------------------------------- hand cases
def test_gspo_hand_case():
  # Row 0: d = (ln 1.5, ln 0.5, ·) with two valid tokens; s = exp(mean d) = sqrt(0.75).
  lp = jnp.log(jnp.array([[0.3, 0.2, 0.9]], jnp.float32))
  old = jnp.log(jnp.array([[0.2, 0.4, 0.1]], jnp.float32))
  a = jnp.array([[2.0, 2.0, 2.0]])
  mask = jnp.array([[1, 1, 0]])
  s = np.sqrt(1.5 * 0.5)                       # 0.866: below 1 − 0.1
  (loss, m), g = jax.jit(jax.value_and_grad(
      lambda lp: losses.gspo(lp, old, a, mask, clip_low=0.1, clip_high=0.1), has_aux=True))(lp)
  # A > 0, s < 1 − ε: max(−2s, −2·0.9) = −2s, unclipped; seq-mean-token-mean = −2s.
  np.testing.assert_allclose(loss, -2 * s, rtol=1e-6)
  np.testing.assert_allclose(g, [[-2 * s / 2, -2 * s / 2, 0]], rtol=1e-6)
  assert float(m["clipfrac"]) == 0.0
  np.testing.assert_allclose(m["approx_kl"], -(np.log(1.5) + np.log(0.5)) / 2, rtol=1e-6)
  # Same with A < 0: L = max(2s, 2·0.9) = 1.8 (clipped, no gradient).
  (loss, m), g = jax.jit(jax.value_and_grad(
      lambda lp: losses.gspo(lp, old, -a, mask, clip_low=0.1, clip_high=0.1), has_aux=True))(lp)
  np.testing.assert_allclose(loss, 1.8, rtol=1e-6)
  np.testing.assert_array_equal(g, 0)
  assert float(m["clipfrac"]) == 1.0


def test_gspo_caps_the_log_ratio_at_10():
  lp = jnp.array([[0.0, 0.0]])
  old = jnp.array([[-30.0, -20.0]])           # mean d = 25 > 10
  a = jnp.array([[-1.0, -1.0]])
  (loss, _), g = jax.jit(jax.value_and_grad(
      lambda lp: losses.gspo(lp, old, a, jnp.ones((1, 2)), clip_low=0.2, clip_high=0.2),
      has_aux=True))(lp)
  np.testing.assert_allclose(loss, np.exp(10.0), rtol=1e-6)   # max(e^10, 1.2) with A = −1
  np.testing.assert_array_equal(g, 0)                           # the cap has no gradient


def test_cispo_hand_case():
  lp = jnp.log(jnp.array([[0.5, 0.5, 0.5]], jnp.float32))
  old = jnp.log(jnp.array([[0.25, 0.5, 1.0]], jnp.float32))   # r = 2, 1, 0.5
  a = jnp.array([[1.0, -1.0, 2.0]])
  (loss, m), g = jax.jit(jax.value_and_grad(
      lambda lp: losses.cispo(lp, old, a, jnp.ones((1, 3)), clip_low=0.2, clip_high=0.28),
      has_aux=True))(lp)
  w = np.array([1.28, 1.0, 0.8])              # clip(r, 0.8, 1.28)
  per = -w * np.array([1.0, -1.0, 2.0]) * np.log(0.5)
  np.testing.assert_allclose(loss, per.mean(), rtol=1e-6)
  np.testing.assert_allclose(g, [-w * np.array([1.0, -1.0, 2.0]) / 3], rtol=1e-6)
  np.testing.assert_allclose(m["clipfrac"], 2 / 3, rtol=1e-6)


def test_gmpo_hand_case():
  # Row 0 (A = 1): d = (0.1, 0.5) -> d' = (0.1, 0.3), ratio = exp(0.2). Row 1 (A = −2):
  # d = (−0.5,) -> d' = max(−0.5, −0.2) = −0.2, ratio = exp(−0.2). Row 2 empty.
  lp = jnp.array([[0.1, 0.5], [-0.5, 9.0], [7.0, 7.0]])
  old = jnp.zeros((3, 2))
  a = jnp.array([[1.0, 1.0], [-2.0, 5.0], [3.0, 3.0]])
  mask = jnp.array([[1, 1], [1, 0], [0, 0]])
  (loss, m), g = jax.jit(jax.value_and_grad(
      lambda lp: losses.gmpo(lp, old, a, mask, clip_low=0.2, clip_high=0.3), has_aux=True))(lp)
  rows = np.array([-1 * np.exp(0.2), 2 * np.exp(-0.2), 0.0])
  np.testing.assert_allclose(loss, rows.sum() / 3, rtol=1e-6)
  # Only row 0's first token is unclipped: d(−exp(mean d'))/d lp = −exp(0.2)/2, over 3 rows.
  np.testing.assert_allclose(g, [[-np.exp(0.2) / 2 / 3, 0], [0, 0], [0, 0]], rtol=1e-6)
  np.testing.assert_allclose(m["clipfrac"], 1 / 3, rtol=1e-6)
  np.testing.assert_allclose(m["clipfrac_lower"], 1 / 3, rtol=1e-6)


# ---------------------------------------------------------------- NumPy re-derivation
@pytest.mark.parametrize("weighted", [False, True])
def test_new_losses_match_float64_numpy(batch, result, weighted):
  want = expected(*batch, weighted)
  for k, (w_loss, w_g, w_m) in want.items():
    loss, g, m = result[weighted][k]
    np.testing.assert_allclose(loss, w_loss, rtol=2e-5, atol=1e-6, err_msg=str(k))
    np.testing.assert_allclose(g, w_g, rtol=2e-5, atol=1e-7, err_msg=str(k))
    for name, v in w_m.items():
      np.testing.assert_allclose(m[name], v, rtol=2e-5, atol=1e-6, err_msg=f"{k} {name}")
    np.testing.assert_array_equal(m["pg_loss"], loss)


def test_masked_values_do_not_matter(batch, result):
  lp, old, a, mask, w = batch
  bad = lambda x, v: jnp.where(mask, x, v)
  got = run_all(bad(lp, jnp.nan), bad(old, jnp.inf), bad(a, -jnp.inf), mask, bad(w, jnp.nan),
                weighted=True)
  for k, v in result[True].items():
    for x, y in zip(jax.tree.leaves(v), jax.tree.leaves(got[k])):
      np.testing.assert_array_equal(x, y, err_msg=str(k))


def test_all_masked_rows_and_batches_give_finite_zeros(batch):
  lp, old, a, mask, w = batch
  nan = jnp.full_like(lp, jnp.nan)
  out = run_all(nan, nan, nan, jnp.zeros_like(mask), nan, weighted=True)
  for k, (loss, g, m) in out.items():
    assert float(loss) == 0.0, k
    assert np.all(np.asarray(g) == 0), k
    assert all(np.isfinite(x) and float(x) == 0 for x in m.values()), k


def test_micro_batches_sum_to_the_mini_batch(batch, result):
  lp, old, a, mask, w = batch
  nt = jnp.sum(mask).astype(jnp.float32)
  ns = jnp.sum(jnp.any(mask, 1)).astype(jnp.float32)
  b = mask.shape[0]

  @jax.jit
  def parts(lp, old, a, mask, w):
    kw = dict(num_tokens=nt, num_seqs=ns, max_len=mask.shape[1], weights=w)
    f = {
        "gspo": lambda lp: losses.gspo(lp, old, a, mask, **GSPO_KW, **kw),
        "cispo": lambda lp: losses.cispo(lp, old, a, mask, agg="seq-mean-token-sum", **CISPO_KW,
                                         **kw),
        "gmpo": lambda lp: losses.gmpo(lp, old, a, mask, num_tokens=nt, num_rows=b, weights=w,
                                       **GMPO_KW),
    }
    return {k: jax.value_and_grad(fn, has_aux=True)(lp) for k, fn in f.items()}

  halves = [parts(*(x[s] for x in batch)) for s in (slice(0, 2), slice(2, None))]
  whole = {"gspo": result[True]["gspo", "seq-mean-token-mean"],
           "cispo": result[True]["cispo", "seq-mean-token-sum"], "gmpo": result[True]["gmpo", None]}
  for k, (loss, g, m) in whole.items():
    np.testing.assert_allclose(sum(h[k][0][0] for h in halves), loss, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(jnp.concatenate([h[k][1] for h in halves]), g, rtol=1e-5,
                               atol=1e-8)
    for name in ("clipfrac", "approx_kl"):
      np.testing.assert_allclose(sum(h[k][0][1][name] for h in halves), m[name], rtol=1e-5,
                                 atol=1e-7, err_msg=f"{k} {name}")


# ---------------------------------------------------------------- weights on the older losses
def test_weights_on_ppo_clip_clip_cov_kl_cov(batch):
  lp, old, a, mask, w = batch
  lp = jnp.where(mask, lp, 0.0)
  old = jnp.where(mask, old, 0.0).at[0, 0].set(lp[0, 0] - 0.5)
  sel = jnp.zeros(mask.shape, bool).at[2, :3].set(True)
  key = jax.random.key(0)

  @functools.partial(jax.jit, static_argnames="mode")
  def run(weights, mode):
    fns = {
        "ppo": lambda lp: losses.ppo_clip(lp, old, a, mask, dual_clip=3.0, agg=mode,
                                          weights=weights),
        "clip_cov": lambda lp: losses.clip_cov(lp, old, a, mask, key=key, selection=sel,
                                               agg=mode, weights=weights),
        "kl_cov": lambda lp: losses.kl_cov(lp, old, a, mask, selection=sel, agg=mode,
                                           weights=weights),
    }
    return {k: jax.value_and_grad(f, has_aux=True)(lp) for k, f in fns.items()}

  for mode in ("token-mean", "seq-mean-token-mean"):
    plain, ones, weighted = run(None, mode), run(jnp.ones_like(w), mode), run(w, mode)
    # Unit weights: the unweighted loss (up to the reduction order XLA picks).
    for k in plain:
      for x, y in zip(jax.tree.leaves(plain[k]), jax.tree.leaves(ones[k])):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-9, err_msg=k)
      # Each token's loss depends only on its own log-prob (fixed selection), so
      # the weights scale each token's gradient.
      np.testing.assert_allclose(weighted[k][1], np.asarray(w) * plain[k][1], rtol=1e-6,
                                 atol=1e-9, err_msg=k)
      # Metrics other than the loss do not see the weights.
      assert float(weighted[k][0][1]["clipfrac"]) == float(plain[k][0][1]["clipfrac"])
  # PPO-clip's weighted value against NumPy: Σ w·L over the aggregation weights.
  lp64, old64, a64 = f64(lp, old, a)
  r = np.exp(np.clip(lp64 - old64, -20, 20))
  per = np.maximum(-a64 * r, -a64 * np.clip(r, 0.8, 1.2))
  per = np.where(a64 < 0, np.minimum(per, -a64 * 3.0), per)
  want = (np_agg_weights(mask, "token-mean") * np.asarray(w) * per).sum()
  np.testing.assert_allclose(run(w, "token-mean")["ppo"][0][0], want, rtol=2e-5)


def test_top_entropy_mask_as_weights_keeps_the_denominator(batch):
  lp, old, a, mask, _ = batch
  keep = jnp.zeros(mask.shape, bool).at[0, :4].set(True) & mask
  loss = jax.jit(lambda k: losses.cispo(lp, old, a, mask, weights=k)[0])(keep.astype(jnp.float32))
  lp64, old64, a64 = f64(lp, old, a)
  r = np.exp(np.clip(lp64 - old64, -20, 20))
  per = -np.clip(r, 0.8, 1.2) * a64 * lp64
  np.testing.assert_allclose(loss, per[np.asarray(keep)].sum() / np.asarray(mask).sum(),
                             rtol=2e-5)


# ---------------------------------------------------------------- bad input
def test_bad_input_raises_value_error_naming_the_argument():
  x = jnp.zeros((2, 3))
  cases = [
      (lambda: losses.gspo(x, x, x, x, agg="sum"), "agg must be one of"),
      (lambda: losses.gspo(x, x, x, x, clip_low=-1e-4), "clip_low"),
      (lambda: losses.cispo(x, x, x, x, clip_high=-0.1), "clip_high"),
      (lambda: losses.gmpo(x, x, x, x, clip_low=1.5), "clip_low"),
      (lambda: losses.gmpo(x, x, x, x, num_rows=0), "num_rows"),
      (lambda: losses.cispo(x, x, x, x, weights=jnp.zeros((2, 4))), "weights"),
      (lambda: losses.ppo_clip(x, x, x, x, weights=jnp.zeros((2, 3), jnp.int32)), "weights"),
  ]
  for fn, match in cases:
    with pytest.raises(ValueError, match=match):
      fn()
