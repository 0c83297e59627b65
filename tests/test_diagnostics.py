"""jaxent.diagnostics against float64 NumPy re-derivations and exact values."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxent import diagnostics


# ------------------------------------------------------------ references ---

def _np_log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _np_entropy(z):
  lp = _np_log_softmax(z)
  p = np.exp(lp)
  return -(p * np.where(p > 0, lp, 0.0)).sum(-1)


def _np_cov_pi(z, u, v):
  """Cov_{a~softmax(z)}(u(a), v(a)) along the last axis, float64."""
  p = np.exp(_np_log_softmax(z))
  eu = (p * u).sum(-1, keepdims=True)
  ev = (p * v).sum(-1, keepdims=True)
  return (p * (u - eu) * (v - ev)).sum(-1)


_first_order = jax.jit(diagnostics.entropy_change_first_order)


# ------------------------------------------------ entropy_change_first_order ---

def test_first_order_matches_float64_covariance():
  rng = np.random.default_rng(0)
  z = rng.normal(size=(3, 4, 11)) * 2.0
  dz = rng.normal(size=(3, 4, 11)) * 0.1
  got = _first_order(jnp.asarray(z, jnp.float32), jnp.asarray(z + dz, jnp.float32))
  assert got.shape == (3, 4) and got.dtype == jnp.float32
  # new_logits - logits is formed in float32, so allow its rounding.
  want = -_np_cov_pi(z, _np_log_softmax(z), dz)
  np.testing.assert_allclose(np.asarray(got), want, rtol=2e-4, atol=2e-6)


@pytest.mark.parametrize("natural", [False, True], ids=["vanilla_pg", "natural_pg"])
def test_first_order_error_is_second_order_in_step(natural):
  """exact ΔH / predicted ΔH → 1 with |ratio − 1| = O(η)."""
  rng = np.random.default_rng(1)
  z = (rng.normal(size=(5, 9)) * 1.5).astype(np.float32).astype(np.float64)
  r = rng.normal(size=(5, 9))
  p = np.exp(_np_log_softmax(z))
  adv = r - (p * r).sum(-1, keepdims=True)  # A = r − E_π r
  direction = adv if natural else p * adv  # Δz / η
  errs = []
  for eta in (1e-1, 1e-2, 1e-3):
    # Work with the float32-representable update the function actually sees.
    z_new = (z + eta * direction).astype(np.float32).astype(np.float64)
    dz = z_new - z
    # The theory's prediction, derived independently: −Cov_π(log π, Δz).
    theory = -_np_cov_pi(z, _np_log_softmax(z), dz)
    assert np.all(np.abs(theory) > 1e-3 * eta)  # ratios are well defined
    exact = _np_entropy(z_new) - _np_entropy(z)
    pred = np.asarray(_first_order(jnp.asarray(z, jnp.float32),
                                   jnp.asarray(z_new, jnp.float32)), np.float64)
    np.testing.assert_allclose(pred, theory, rtol=1e-4)
    errs.append(np.max(np.abs(exact / pred - 1.0)))
  # Relative error shrinks about tenfold per tenfold smaller step.
  assert errs[1] < errs[0] / 5 and errs[2] < errs[1] / 5, errs
  assert errs[2] < 0.02


def test_first_order_ignores_masked_actions_and_constant_shifts():
  z = np.array([0.3, -1.2, 2.0, 0.1], np.float32)
  dz = np.array([0.05, -0.02, 0.01, 0.03], np.float32)
  masked = np.concatenate([z, [-np.inf]]).astype(np.float32)
  masked_new = np.concatenate([z + dz, [-np.inf]]).astype(np.float32)
  got = _first_order(masked, masked_new)
  want = _first_order(z, z + dz)
  assert np.isfinite(got)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  # A constant logit shift leaves π, hence H, unchanged.
  np.testing.assert_allclose(_first_order(z, z + 3.0), 0.0, atol=1e-6)


def test_first_order_rejects_mismatched_shapes():
  with pytest.raises(ValueError, match="new_logits"):
    diagnostics.entropy_change_first_order(jnp.zeros((2, 3)), jnp.zeros((2, 4)))


# ---------------------------------------------------------- token_covariance ---

_QS = (0.0, 0.5, 0.9, 0.99, 0.999, 1.0)
_token_cov = jax.jit(lambda lp, a, m: diagnostics.token_covariance(lp, a, m, quantiles=_QS))


def _batch(seed, lengths, t=16):
  rng = np.random.default_rng(seed)
  b = len(lengths)
  lp = -rng.exponential(1.5, size=(b, t))
  adv = rng.normal(size=(b, t))
  mask = np.arange(t)[None, :] < np.asarray(lengths)[:, None]
  # Garbage in the padding must not reach any output.
  lp = np.where(mask, lp, np.nan)
  adv = np.where(mask, adv, np.inf)
  return lp, adv, mask


def _np_token_cov(lp, adv, mask):
  lv, av = lp[mask].astype(np.float64), adv[mask].astype(np.float64)
  c = (av - av.mean()) * (lv - lv.mean())
  per = np.zeros(lp.shape)
  per[mask] = c
  return per, c


def test_token_covariance_matches_float64_numpy():
  lp, adv, mask = _batch(0, [16, 3, 0, 9, 12])
  per, stats = _token_cov(jnp.asarray(lp, jnp.float32), jnp.asarray(adv, jnp.float32),
                          jnp.asarray(mask.astype(np.int32)))
  want_per, c = _np_token_cov(lp, adv, mask)
  assert per.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(per), want_per, rtol=1e-4, atol=1e-5)
  assert np.all(np.asarray(per)[~mask] == 0.0)
  want = {
      "cov": c.mean(), "cov_std": c.std(), "cov_min": c.min(), "cov_max": c.max(),
      "cov_frac_pos": (c > 0).mean(),
  }
  for q in _QS:
    want[f"cov_p{100 * q:g}"] = np.quantile(c, q)
  assert set(stats) == set(want)
  for k, v in want.items():
    assert np.isfinite(stats[k]), k
    np.testing.assert_allclose(float(stats[k]), v, rtol=1e-4, atol=1e-5, err_msg=k)
  # The batch covariance is the sample covariance of (log π, A) with 1/N.
  np.testing.assert_allclose(
      float(stats["cov"]), np.cov(lp[mask], adv[mask], bias=True)[0, 1], rtol=1e-4)


def test_token_covariance_new_mask_does_not_recompile():
  lp, adv, mask = _batch(1, [5, 16, 1, 7, 2])
  before = _token_cov._cache_size()
  _, stats = _token_cov(jnp.asarray(lp, jnp.float32), jnp.asarray(adv, jnp.float32),
                        jnp.asarray(mask.astype(np.int32)))
  _, c = _np_token_cov(lp, adv, mask)
  np.testing.assert_allclose(float(stats["cov_p90"]), np.quantile(c, 0.9),
                             rtol=1e-4, atol=1e-5)
  assert _token_cov._cache_size() <= max(before, 1)


def test_token_covariance_degenerate_masks_give_zeros_not_nan():
  lp, adv, _ = _batch(2, [16] * 5)
  empty = np.zeros(lp.shape, bool)
  single = empty.copy()
  single[2, 4] = True
  for mask in (empty, single):
    per, stats = _token_cov(jnp.asarray(np.where(mask, lp, np.nan), jnp.float32),
                            jnp.asarray(adv, jnp.float32), jnp.asarray(mask.astype(np.int32)))
    assert np.all(np.asarray(per) == 0.0)
    for k, v in stats.items():
      assert float(v) == 0.0, (k, v)


def test_token_covariance_rejects_bad_arguments():
  x = jnp.zeros((2, 3))
  with pytest.raises(ValueError, match="advantages"):
    diagnostics.token_covariance(x, jnp.zeros((2, 4)), x)
  with pytest.raises(ValueError, match="mask"):
    diagnostics.token_covariance(x, x, jnp.zeros((3,)))
  with pytest.raises(ValueError, match="quantiles"):
    diagnostics.token_covariance(x, x, x, quantiles=(1.5,))


# ----------------------------------------------------------- fit_entropy_law ---

_A, _B = 0.35, 0.85


def _law_data(n=300, sigma=0.01, seed=0):
  rng = np.random.default_rng(seed)
  # Entropy collapses fast, then slowly, as in the paper's runs.
  h = 0.1 + 1.4 * np.exp(-np.arange(n) / (n / 6))
  r = -_A * np.exp(h) + _B + sigma * rng.normal(size=n)
  return h, r


def test_law_fit_recovers_coefficients_and_matches_polyfit():
  sigma = 0.01
  h, r = _law_data(sigma=sigma)
  fit = diagnostics.fit_entropy_law(h, r)
  assert fit[:4] == (fit.a, fit.b, fit.r2, fit.ceiling)
  slope, icpt = np.polyfit(np.exp(h), r, 1)
  np.testing.assert_allclose([fit.a, fit.b], [-slope, icpt], rtol=1e-9)
  # Statistical check: within 5 standard errors of the truth.
  x = np.exp(h)
  se_slope = sigma / np.sqrt(np.sum((x - x.mean())**2))
  se_icpt = sigma * np.sqrt(1 / x.size + x.mean()**2 / np.sum((x - x.mean())**2))
  assert abs(fit.a - _A) < 5 * se_slope
  assert abs(fit.b - _B) < 5 * se_icpt
  assert fit.ceiling == pytest.approx(fit.b - fit.a)
  resid = r - (slope * x + icpt)
  assert fit.r2 == pytest.approx(1 - np.sum(resid**2) / np.sum((r - r.mean())**2))
  assert fit.rmse == pytest.approx(np.sqrt(np.mean(resid**2)))
  assert fit.n_fit == h.size and fit.n_pred == 0 and np.isnan(fit.pred_rmse)


@pytest.mark.parametrize("method", ["huber", "theil-sen"])
def test_robust_fits_survive_outlying_rewards(method):
  h, r = _law_data(sigma=0.01, seed=3)
  rng = np.random.default_rng(4)
  bad = rng.choice(h.size, size=h.size // 10, replace=False)
  r = r.copy()
  r[bad] = 0.0  # a broken evaluation now and then
  ols = diagnostics.fit_entropy_law(h, r)
  robust = diagnostics.fit_entropy_law(h, r, method=method)
  assert robust.method == method
  assert abs(ols.b - _B) > 0.03  # the outliers do move least squares
  assert abs(robust.a - _A) < 0.01 and abs(robust.b - _B) < 0.01


def test_theil_sen_survives_entropy_spikes():
  h, r = _law_data(sigma=0.01, seed=5)
  h = h.copy()
  h[::15] += 1.5  # entropy spikes whose reward did not follow the law
  fit = diagnostics.fit_entropy_law(h, r, method="theil-sen")
  assert abs(fit.a - _A) < 0.02 and abs(fit.b - _B) < 0.03


def test_fit_first_predicts_the_rest():
  sigma = 0.01
  h, r = _law_data(sigma=sigma, seed=6)
  k = 100
  fit = diagnostics.fit_entropy_law(h, r, fit_first=k)
  slope, icpt = np.polyfit(np.exp(h[:k]), r[:k], 1)
  err = r[k:] - (slope * np.exp(h[k:]) + icpt)
  assert (fit.n_fit, fit.n_pred) == (k, h.size - k)
  assert fit.pred_rmse == pytest.approx(np.sqrt(np.mean(err**2)))
  assert fit.pred_mae == pytest.approx(np.mean(np.abs(err)))
  # Late performance is predicted to about the noise level.
  assert fit.pred_rmse < 2 * sigma
  np.testing.assert_allclose(fit.predict(h[k:]), slope * np.exp(h[k:]) + icpt)


@pytest.mark.parametrize("entropy,reward,kwargs,match", [
    ([1.0, 0.5], [0.1, 0.2], {}, "at least 3"),
    ([0.7] * 5, [0.1, 0.2, 0.3, 0.4, 0.5], {}, "constant"),
    ([1.0, 0.8, np.nan, 0.5], [0.1, 0.2, 0.3, 0.4], {}, "entropy.*non-finite"),
    ([1.0, 0.8, 0.6, 0.5], [0.1, np.inf, 0.3, 0.4], {}, "reward.*non-finite"),
    ([1.0, 0.8, 0.6, 0.5], [0.1, 0.2, 0.3], {}, "same length"),
    ([[1.0, 0.8], [0.6, 0.5]], [[0.1, 0.2], [0.3, 0.4]], {}, "1-D"),
    ([1.0, 0.8, 0.6, 0.5], [0.1, 0.2, 0.3, 0.4], {"fit_first": 4}, "fit_first"),
    ([1.0, 0.8, 0.6, 0.5], [0.1, 0.2, 0.3, 0.4], {"fit_first": 2}, "fit_first"),
    ([1.0, 0.8, 0.6, 0.5], [0.1, 0.2, 0.3, 0.4], {"fit_first": 3.0}, "fit_first"),
    ([0.7, 0.7, 0.7, 0.5], [0.1, 0.2, 0.3, 0.4], {"fit_first": 3}, "constant"),
    ([1.0, 0.8, 0.6, 0.5], [0.1, 0.2, 0.3, 0.4], {"method": "l1"}, "method"),
    ([1e3, 0.8, 0.6, 0.5], [0.1, 0.2, 0.3, 0.4], {}, "too large"),
    (["a", "b", "c"], [0.1, 0.2, 0.3], {}, "entropy"),
])
def test_law_fit_rejects_degenerate_input(entropy, reward, kwargs, match):
  with pytest.raises(ValueError, match=match):
    diagnostics.fit_entropy_law(entropy, reward, **kwargs)


def test_token_covariance_agrees_with_the_losses_selection_covariance():
  # The covariance the Clip-Cov/KL-Cov selections rank by is the one logged.
  from jaxent import losses
  lp, adv, mask = _batch(7, [16, 4, 11, 0, 16])
  args = (jnp.asarray(lp, jnp.float32), jnp.asarray(adv, jnp.float32),
          jnp.asarray(mask.astype(np.int32)))
  per, _ = _token_cov(*args)
  np.testing.assert_allclose(np.asarray(per), np.asarray(losses.token_covariance(*args)),
                             rtol=1e-6, atol=1e-6)
