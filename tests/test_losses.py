"""losses: PPO-clip, Clip-Cov, KL-Cov, their selections, KL penalty, entropy bonus.

References: hand-computed cases; an independent float64 NumPy re-derivation of
each loss, metric, gradient and aggregation (including a NumPy port of the
reference verl KL-Cov selection); statistical tests of Clip-Cov's choice.
"""
import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads
from scipy import stats

from jaxent import losses, ops

MODES = ops.AGG_MODES
CL, CH, DUAL = 0.2, 0.28, 3.0  # clip-higher and a dual clip
RATIO, LB, UB, BETA = 0.06, 0.05, 1.5, 0.7


# ---------------------------------------------------------------- NumPy references
def np_weights(mask, mode, max_len=None):
  """d(aggregate)/d(per-token loss): the weight of each valid token."""
  mask = np.asarray(mask, bool)
  w = np.zeros(mask.shape)
  n_rows = mask.any(1).sum()
  for b in range(mask.shape[0]):
    n_b = mask[b].sum()
    if mode == "token-mean":
      w[b] = 1 / mask.sum() if mask.sum() else 0
    elif mode == "seq-mean-token-sum":
      w[b] = 1 / n_rows if n_b else 0
    elif mode == "seq-mean-token-mean":
      w[b] = 1 / (n_rows * n_b) if n_b else 0
    else:
      w[b] = 1 / (max_len or mask.shape[1])
  return np.where(mask, w, 0)


def np_ppo(lp, old, a, clip_low, clip_high, dual=None):
  """Per-token PPO terms and d(L)/d(log π) in float64."""
  lp, old, a = (np.asarray(x, np.float64) for x in (lp, old, a))
  raw = lp - old
  d = np.clip(raw, -20, 20)
  r = np.exp(d)
  l1 = -a * r
  l2 = -a * np.clip(r, 1 - clip_low, 1 + clip_high)
  loss = np.maximum(l1, l2)
  grad = np.where((l1 >= l2) & (np.abs(raw) < 20), -a * r, 0.0)
  lower = np.zeros(lp.shape, bool)
  if dual is not None:
    lower = (a < 0) & (loss > -a * dual)
    loss = np.where(lower, -a * dual, loss)
    grad = np.where(lower, 0.0, grad)
  return dict(d=d, l1=l1, l2=l2, loss=loss, grad=grad, lower=lower)


def np_cov(lp, a, mask):
  mask = np.asarray(mask, bool)
  lp, a = np.asarray(lp, np.float64), np.asarray(a, np.float64)
  return np.where(mask, (a - a[mask].mean()) * (lp - lp[mask].mean()), 0) if mask.any() else \
      np.zeros(mask.shape)


def verl_kl_cov_selection(lp, a, mask, ratio):
  """NumPy port of verl's compute_policy_loss_kl_cov token choice."""
  mask = np.asarray(mask) > 0
  flat_idx = np.flatnonzero(mask.reshape(-1))
  adv = np.asarray(a, np.float64).reshape(-1)[flat_idx]
  logp = np.asarray(lp, np.float64).reshape(-1)[flat_idx]
  sel = np.zeros(mask.size, bool)
  if len(adv):
    cov = (adv - adv.mean()) * (logp - logp.mean())
    k = max(1, int(len(cov) * ratio))
    sel[flat_idx[np.argsort(-cov, kind="stable")[:k]]] = True
  return sel.reshape(mask.shape)


def np_clip_cov_candidates(lp, old, a, mask, ratio, lb, ub, clip_low, clip_high):
  mask = np.asarray(mask, bool)
  t = np_ppo(lp, old, a, clip_low, clip_high)
  cov = np_cov(lp, a, mask)
  cand = mask & ~(t["l2"] > t["l1"]) & (cov > lb) & (cov < ub)
  count = min(max(1, int(ratio * mask.sum())), cand.sum())
  return cand, count


def np_mean(x, mask):
  mask = np.asarray(mask, bool)
  return float(np.asarray(x, np.float64)[mask].mean()) if mask.any() else 0.0


# ---------------------------------------------------------------- inputs
def make_batch(seed, b=6, t=20, drift=0.3):
  rng = np.random.default_rng(seed)
  lp = -rng.exponential(1.5, size=(b, t))
  old = lp + drift * rng.normal(size=(b, t))
  a = rng.normal(size=(b, 1)) + 0.3 * rng.normal(size=(b, t))
  lens = rng.integers(t // 3, t + 1, size=b)
  lens[1] = 0  # an empty response
  mask = np.arange(t)[None] < lens[:, None]
  old[0, 0] = lp[0, 0] - 25.0  # beyond the ±20 log-ratio clamp
  f = lambda x: jnp.asarray(x, jnp.float32)
  return f(lp), f(old), f(a), jnp.asarray(mask), jax.random.key(seed)


@functools.partial(jax.jit, static_argnames=("given_sel", "norm"))
def run_all(lp, old, a, mask, key, sel_clip, sel_kl, nt, ns, ml, given_sel=False, norm=False):
  """Value, grad and metrics of the three losses for every aggregation mode."""
  kw_n = dict(num_tokens=nt, num_seqs=ns, max_len=ml) if norm else {}
  out = {}
  if not given_sel:
    sel_clip = losses.select_clip_cov(lp, old, a, mask, key=key, ratio=RATIO, cov_lb=LB,
                                      cov_ub=UB, clip_low=CL, clip_high=CH)
    sel_kl = losses.select_kl_cov(lp, a, mask, ratio=RATIO)
  out["sel", "clip"], out["sel", "kl"] = sel_clip, sel_kl
  for mode in MODES:
    fns = {
        "ppo": lambda lp: losses.ppo_clip(lp, old, a, mask, clip_low=CL, clip_high=CH,
                                          dual_clip=DUAL, agg=mode, **kw_n),
        "clip_cov": lambda lp: losses.clip_cov(lp, old, a, mask, key=key, ratio=RATIO,
                                               cov_lb=LB, cov_ub=UB, clip_low=CL, clip_high=CH,
                                               agg=mode, selection=sel_clip if given_sel else None,
                                               **kw_n),
        "kl_cov": lambda lp: losses.kl_cov(lp, old, a, mask, ratio=RATIO, kl_coef=BETA,
                                           agg=mode, selection=sel_kl if given_sel else None,
                                           **kw_n),
    }
    for name, f in fns.items():
      (loss, m), g = jax.value_and_grad(f, has_aux=True)(lp)
      out[name, mode] = (loss, g, m)
  return out


def _run(lp, old, a, mask, key, **kw):
  return run_all(lp, old, a, mask, key, None, None, None, None, None, **kw)


@pytest.fixture(scope="module")
def batch():
  return make_batch(0)


@pytest.fixture(scope="module")
def result(batch):
  return _run(*batch)


def np_expected(lp, old, a, mask, sel_clip, sel_kl, mode, max_len=None):
  """Independent float64 loss, gradient and metrics of all three losses."""
  mask = np.asarray(mask, bool)
  w = np_weights(mask, mode, max_len)
  cov = np_cov(lp, a, mask)
  raw = np.asarray(lp, np.float64) - np.asarray(old, np.float64)
  ppo = np_ppo(lp, old, a, CL, CH, DUAL)
  plain = np_ppo(lp, old, a, CL, CH)
  clipfrac = np_mean(plain["l2"] > plain["l1"], mask)
  approx_kl = np_mean(-plain["d"], mask)
  n = mask.sum()

  def sel_metrics(sel):
    sel = sel & mask
    return {"selected_frac": sel.sum() / n if n else 0.0, "num_selected": sel.sum(),
            "selected_cov_mean": cov[sel].mean() if sel.any() else 0.0}

  out = {}
  out["ppo"] = ((w * ppo["loss"]).sum(), w * ppo["grad"],
                {"clipfrac": clipfrac, "approx_kl": approx_kl,
                 "clipfrac_lower": np_mean(ppo["lower"], mask)})
  cc_loss = np.where(sel_clip, 0, plain["loss"])
  cc_grad = np.where(sel_clip, 0, plain["grad"])
  out["clip_cov"] = ((w * cc_loss).sum(), w * cc_grad,
                     {"clipfrac": clipfrac, "approx_kl": approx_kl, **sel_metrics(sel_clip)})
  r = np.exp(plain["d"])
  pg = -np.asarray(a, np.float64) * r
  pen = np.where(sel_kl, BETA * np.abs(raw), 0)
  g_kl = np.where(np.abs(raw) < 20, pg, 0) + np.where(sel_kl, BETA * np.sign(raw), 0)
  out["kl_cov"] = ((w * (pg + pen)).sum(), w * g_kl,
                   {"clipfrac": 0.0, "approx_kl": approx_kl,
                    "abs_kl": np_mean(np.abs(plain["d"]), mask), "pg_loss": (w * pg).sum(),
                    "kl_penalty": (w * pen).sum(), **sel_metrics(sel_kl)})
  return out


def _compare(got, want, mask, rtol=2e-5, atol=1e-6):
  loss, g, m = got
  w_loss, w_g, w_m = want
  np.testing.assert_allclose(loss, w_loss, rtol=rtol, atol=atol)
  np.testing.assert_allclose(g, w_g, rtol=rtol, atol=atol)
  for k, v in w_m.items():
    np.testing.assert_allclose(m[k], v, rtol=rtol, atol=atol, err_msg=k)


# ---------------------------------------------------------------- hand cases
def test_ppo_clip_hand_case():
  d = np.log([1.5, 0.5, 4.0, 1.1])
  lp = jnp.asarray([[-1.0, -2.0, -0.5, -3.0]])
  old = lp - jnp.asarray([d], jnp.float32)
  a = jnp.asarray([[1.0, 1.0, -1.0, -2.0]])
  f = jax.jit(jax.value_and_grad(
      lambda lp: losses.ppo_clip(lp, old, a, jnp.ones((1, 4)), clip_low=0.2, clip_high=0.2,
                                 dual_clip=3.0), has_aux=True))
  (loss, m), g = f(lp)
  # Per token: clipped at 1.2 -> -1.2; unclipped -0.5; dual clip -A*c = 3; unclipped 2.2.
  np.testing.assert_allclose(loss, (-1.2 - 0.5 + 3.0 + 2.2) / 4, rtol=1e-6)
  np.testing.assert_allclose(m["clipfrac"], 0.25)
  np.testing.assert_allclose(m["clipfrac_lower"], 0.25)
  np.testing.assert_allclose(m["approx_kl"], -math.log(1.5 * 0.5 * 4.0 * 1.1) / 4, rtol=1e-6)
  # Only the unclipped tokens carry gradient: d(-A r)/d log pi = -A r.
  np.testing.assert_allclose(g, [[0.0, -0.5 / 4, 0.0, 2.2 / 4]], rtol=1e-5)


def test_kl_cov_and_clip_cov_hand_case():
  lp = jnp.asarray([[-1.0, -2.0, -0.5, -3.0]])
  a = jnp.asarray([[1.0, -1.0, 2.0, 0.0]])
  mask = jnp.ones((1, 4))

  @jax.jit
  def f(d_kl, d_clip, key):
    return (losses.token_covariance(lp, a, mask),
            losses.select_kl_cov(lp, a, mask, ratio=0.5),
            losses.kl_cov(lp, lp - d_kl, a, mask, ratio=0.5, kl_coef=1.0),
            losses.clip_cov(lp, lp - d_clip, a, mask, key=key, ratio=0.5, cov_lb=0.4,
                            cov_ub=1.0))

  cov, sel, (kl_loss, kl_m), (cc_loss, cc_m) = f(
      jnp.asarray([[0.1, 0.2, -0.3, 0.4]]), jnp.asarray([[0.3, 0.2, -0.3, 0.4]]),
      jax.random.key(3))
  # mean A = 0.5, mean lp = -1.625: Cov = [0.3125, 0.5625, 1.6875, 0.6875].
  np.testing.assert_allclose(cov, [[0.3125, 0.5625, 1.6875, 0.6875]], rtol=1e-6)
  np.testing.assert_array_equal(sel, [[False, False, True, True]])  # top 2 of 4
  want = (-math.exp(0.1) + math.exp(0.2) + (-2 * math.exp(-0.3) + 0.3) + 0.4) / 4
  np.testing.assert_allclose(kl_loss, want, rtol=1e-6)
  np.testing.assert_allclose(kl_m["kl_penalty"], 0.7 / 4, rtol=1e-6)
  np.testing.assert_allclose(kl_m["selected_frac"], 0.5)
  np.testing.assert_allclose(kl_m["selected_cov_mean"], (1.6875 + 0.6875) / 2, rtol=1e-6)
  # Clip-Cov, band (0.4, 1.0): candidates 1 and 3 (token 0 is PPO-clipped:
  # r = e^0.3 > 1.2 with A > 0). ratio 0.5 -> 2 = all candidates, whatever the key.
  np.testing.assert_allclose(cc_loss, (-1.2 + 0.0 + -2 * math.exp(-0.3) + 0.0) / 4, rtol=1e-6)
  np.testing.assert_allclose(cc_m["clipfrac"], 0.25)
  np.testing.assert_allclose(cc_m["selected_frac"], 0.5)


def test_registry_runs_each_configured_family_like_the_hand_cases():
  from jaxent.config import LOSSES, LossConfig
  assert tuple(losses.POLICY_LOSSES) == LOSSES
  lp = jnp.asarray([[-1.0, -2.0, -0.5, -3.0]])
  a = jnp.asarray([[1.0, -1.0, 2.0, 0.0]])
  mask = jnp.ones((1, 4))
  d = jnp.asarray([[0.1, 0.2, -0.3, 0.4]])
  x = losses.PolicyInputs(lp, lp - d, a, mask)
  kl = losses.policy_loss("kl_cov")
  cfg = LossConfig(name="kl_cov", ratio=0.5, kl_coef=1.0)
  sel = kl.select(cfg, x, jax.random.key(0))
  np.testing.assert_array_equal(sel, [[False, False, True, True]])  # top 2 covariances
  loss, m = kl.loss(cfg, x, sel, {})
  np.testing.assert_allclose(loss, (-math.exp(0.1) + math.exp(0.2) + (-2 * math.exp(-0.3) + 0.3) + 0.4) / 4,
                             rtol=1e-6)
  # Clip-Cov: band (0.4, 1.0) holds tokens 1 and 3, both chosen at ratio 0.5.
  cc = losses.policy_loss("clip_cov")
  cfg = LossConfig(name="clip_cov", ratio=0.5, cov_lb=0.4, cov_ub=1.0)
  x = x._replace(old_log_prob=lp - jnp.asarray([[0.3, 0.2, -0.3, 0.4]]))
  sel = cc.select(cfg, x, jax.random.key(1))
  np.testing.assert_array_equal(sel, [[False, True, False, True]])
  loss, _ = cc.loss(cfg, x, sel, {})
  np.testing.assert_allclose(loss, (-1.2 + 0.0 + -2 * math.exp(-0.3) + 0.0) / 4, rtol=1e-6)
  ppo = losses.policy_loss("ppo_clip")
  assert ppo.select is None
  loss, _ = ppo.loss(LossConfig(), x, None, dict(num_tokens=jnp.asarray(8.0), num_rows=1))
  np.testing.assert_allclose(loss, (-1.2 + math.exp(0.2) - 2 * math.exp(-0.3) + 0.0) / 8, rtol=1e-6)


def test_registry_names_unknown_and_duplicate_families():
  with pytest.raises(ValueError, match=r"unknown policy loss 'nope'; known: \['cispo', 'clip_cov', 'gmpo', 'gspo', 'kl_cov', 'ppo_clip'\]"):
    losses.policy_loss("nope")
  with pytest.raises(ValueError, match="'ppo_clip' is already registered"):
    losses.register_policy_loss(losses.PolicyLoss("ppo_clip", lambda *a: None))


# ---------------------------------------------------------------- NumPy parity
def test_losses_match_float64_numpy_for_every_mode(batch, result):
  lp, old, a, mask, _ = batch
  sel_kl = np.asarray(result["sel", "kl"])
  np.testing.assert_array_equal(sel_kl, verl_kl_cov_selection(lp, a, mask, RATIO))
  sel_clip = np.asarray(result["sel", "clip"])
  cand, count = np_clip_cov_candidates(lp, old, a, mask, RATIO, LB, UB, CL, CH)
  assert count >= 2 and cand.sum() > count  # a real choice was made
  assert not np.any(sel_clip & ~cand) and sel_clip.sum() == count
  assert np.any(np.asarray(result["ppo", "token-mean"][2]["clipfrac"]) > 0)
  for mode in MODES:
    want = np_expected(lp, old, a, mask, sel_clip, sel_kl, mode)
    for name in ("ppo", "clip_cov", "kl_cov"):
      _compare(result[name, mode], want[name], mask)


def test_verl_selection_rounding_of_the_count():
  # 2e-4 * 15000 = 3 in double precision but 2.99999992 in float32.
  t = 15000
  rng = np.random.default_rng(1)
  lp = jnp.asarray(-rng.exponential(size=(1, t)), jnp.float32)
  a = jnp.asarray(rng.normal(size=(1, t)), jnp.float32)
  sel = jax.jit(functools.partial(losses.select_kl_cov, ratio=2e-4))(lp, a, jnp.ones((1, t)))
  np.testing.assert_array_equal(sel, verl_kl_cov_selection(lp, a, np.ones((1, t)), 2e-4))
  assert int(sel.sum()) == 3


def test_gradients_finite_difference_x64():
  lp, old, a, mask, key = make_batch(2, b=3, t=6, drift=0.5)
  old = old.at[0, 0].set(lp[0, 0] - 0.3)  # stay inside the clamp: FD needs smooth points
  with jax.enable_x64(True):
    f64 = lambda x: jnp.asarray(x, jnp.float64)
    lp, old, a = f64(lp), f64(old), f64(a)
    sel = jax.jit(functools.partial(losses.select_kl_cov, ratio=0.3))(lp, a, mask)
    assert 0 < int(sel.sum()) < int(mask.sum())

    def total(lp):  # one finite-difference check over every differentiable path
      return (losses.ppo_clip(lp, old, a, mask, clip_low=CL, clip_high=CH, dual_clip=DUAL,
                              agg="seq-mean-token-mean")[0]
              + losses.clip_cov(lp, old, a, mask, selection=sel, agg="token-mean")[0]
              + losses.kl_cov(lp, old, a, mask, selection=sel, kl_coef=BETA,
                              agg="seq-mean-token-sum")[0]
              + losses.kl_penalty(lp, old, mask, kind="k3")[0])
    check_grads(jax.jit(total), (lp,), order=1, modes=["rev"], eps=1e-5)


# ---------------------------------------------------------------- invariances
def test_masked_values_do_not_matter(batch, result):
  lp, old, a, mask, key = batch
  bad = lambda x, v: jnp.where(mask, x, v)
  got = _run(bad(lp, jnp.nan), bad(old, jnp.inf), bad(a, jnp.nan), mask, key)
  for k, v in result.items():
    for x, y in zip(jax.tree.leaves(v), jax.tree.leaves(got[k])):
      np.testing.assert_array_equal(x, y, err_msg=str(k))


def test_mask_equals_dropping_padding(batch, result):
  lp, old, a, mask, key = batch
  t = int(np.asarray(mask).sum(1).max())
  assert t < mask.shape[1]
  keep = np.asarray(mask).any(1)  # also drop the empty response
  crop = lambda x: x[keep][:, :t]
  got = run_all(crop(lp), crop(old), crop(a), crop(mask), key, crop(result["sel", "clip"]),
                crop(result["sel", "kl"]), None, None, mask.shape[1], given_sel=True, norm=True)
  sel_kl = jax.jit(functools.partial(losses.select_kl_cov, ratio=RATIO))(
      crop(lp), crop(a), crop(mask))
  np.testing.assert_array_equal(sel_kl, crop(result["sel", "kl"]))
  for k, v in result.items():
    if k[0] == "sel":
      continue
    loss, g, m = v
    np.testing.assert_allclose(got[k][0], loss, rtol=1e-5, atol=1e-7, err_msg=str(k))
    np.testing.assert_allclose(got[k][1], crop(g), rtol=1e-5, atol=1e-7, err_msg=str(k))
    for name in m:
      np.testing.assert_allclose(got[k][2][name], m[name], rtol=1e-5, atol=1e-7,
                                 err_msg=f"{k} {name}")


def test_micro_batches_with_global_normalizers_sum_to_the_mini_batch(batch, result):
  lp, old, a, mask, key = batch
  nt = jnp.sum(mask).astype(jnp.float32)
  ns = jnp.sum(jnp.any(mask, 1)).astype(jnp.float32)
  half = mask.shape[0] // 2
  parts = []
  for s in (slice(0, half), slice(half, None)):
    parts.append(run_all(lp[s], old[s], a[s], mask[s], key, result["sel", "clip"][s],
                         result["sel", "kl"][s], nt, ns, jnp.float32(mask.shape[1]),
                         given_sel=True, norm=True))
  for k, v in result.items():
    if k[0] == "sel":
      continue
    loss, g, m = v
    np.testing.assert_allclose(sum(p[k][0] for p in parts), loss, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(jnp.concatenate([p[k][1] for p in parts]), g, rtol=1e-5,
                               atol=1e-8)
    for name in ("clipfrac", "approx_kl", "selected_frac", "num_selected", "kl_penalty"):
      if name in m:
        np.testing.assert_allclose(sum(p[k][2][name] for p in parts), m[name], rtol=1e-5,
                                   atol=1e-7, err_msg=f"{k} {name}")


def test_all_masked_batch_gives_zero_loss_and_finite_grads(batch):
  lp, old, a, mask, key = batch
  nan = jnp.full_like(lp, jnp.nan)
  out = _run(nan, nan, nan, jnp.zeros_like(mask), key)
  assert not np.any(out["sel", "clip"]) and not np.any(out["sel", "kl"])
  for k, v in out.items():
    if k[0] == "sel":
      continue
    loss, g, m = v
    assert float(loss) == 0.0, k
    assert np.all(np.asarray(g) == 0), k
    assert all(np.isfinite(x) for x in m.values()), k


def test_kl_cov_penalty_and_its_gradient_vanish_on_policy(batch):
  lp, _, a, mask, key = batch
  out = _run(lp, lp, a, mask, key)
  for mode in MODES:
    loss, g, m = out["kl_cov", mode]
    assert float(m["kl_penalty"]) == 0.0
    w = np_weights(mask, mode)
    np.testing.assert_allclose(g, -w * np.asarray(a, np.float64), rtol=1e-5, atol=1e-8)


# ---------------------------------------------------------------- Clip-Cov randomness
def test_clip_cov_selection_is_a_uniform_random_subset():
  lp, old, a, mask, _ = make_batch(15, b=3, t=10, drift=0.4)
  ratio, lb, ub = 0.2, -0.5, 0.8
  cand, count = np_clip_cov_candidates(lp, old, a, mask, ratio, lb, ub, CL, CH)
  n_cand = int(cand.sum())
  # 3 of 8 candidates among 18 valid tokens (the others clipped or out of band).
  assert (count, n_cand, int(np.asarray(mask).sum())) == (3, 8, 18)
  select = jax.jit(jax.vmap(lambda k: losses.select_clip_cov(
      lp, old, a, mask, key=k, ratio=ratio, cov_lb=lb, cov_ub=ub, clip_low=CL, clip_high=CH)))
  n_draws = 50 * math.comb(n_cand, count)
  sel = np.asarray(select(jax.random.split(jax.random.key(0), n_draws))).reshape(n_draws, -1)
  idx = np.flatnonzero(cand.reshape(-1))
  assert np.all(sel.sum(1) == count) and not np.any(sel[:, ~cand.reshape(-1)])
  # Each candidate equally often ...
  freq = sel[:, idx].sum(0)
  assert stats.chisquare(freq).pvalue > 1e-4, freq
  # ... and each subset equally often.
  subsets = {s: i for i, s in enumerate(itertools.combinations(range(n_cand), count))}
  codes = [subsets[tuple(np.flatnonzero(row))] for row in sel[:, idx]]
  counts = np.bincount(codes, minlength=len(subsets))
  assert stats.chisquare(counts).pvalue > 1e-4


def test_clip_cov_same_key_same_choice(batch):
  lp, old, a, mask, _ = batch
  select = jax.jit(lambda k: losses.select_clip_cov(lp, old, a, mask, key=k, ratio=RATIO,
                                                    cov_lb=LB, cov_ub=UB, clip_low=CL,
                                                    clip_high=CH))
  k1, k2, k3 = jax.random.split(jax.random.key(7), 3)
  np.testing.assert_array_equal(select(k1), select(k1))
  assert any(np.any(select(k1) != select(k)) for k in (k2, k3))


# ---------------------------------------------------------------- jit behaviour
def test_no_host_transfers_and_no_recompile_with_traced_hyperparameters(batch):
  lp, old, a, mask, key = batch
  traces = []

  @functools.partial(jax.jit, static_argnames=("k_max",))
  def step(lp, old, a, mask, key, ratio, lb, ub, cl, ch, dual, beta, k_max):
    traces.append(1)
    pc = losses.ppo_clip(lp, old, a, mask, clip_low=cl, clip_high=ch, dual_clip=dual)
    cc = losses.clip_cov(lp, old, a, mask, key=key, ratio=ratio, cov_lb=lb, cov_ub=ub,
                         clip_low=cl, clip_high=ch, k_max=k_max)
    kc = losses.kl_cov(lp, old, a, mask, ratio=ratio, kl_coef=beta, k_max=k_max)
    return pc, cc, kc

  f = jnp.float32
  args1 = [jax.device_put(x) for x in (lp, old, a, mask, key, f(RATIO), f(LB), f(UB), f(CL),
                                       f(CH), f(DUAL), f(BETA))]
  args2 = [jax.device_put(x) for x in (lp + 0.1, old, -a, mask, jax.random.key(9), f(0.1),
                                       f(0.0), f(2.0), f(0.1), f(0.3), f(5.0), f(0.2))]
  with jax.transfer_guard("disallow"):
    out1 = step(*args1, k_max=12)
    step(*args2, k_max=12)
  assert len(traces) == 1 and step._cache_size() == 1
  # Traced hyperparameters with a static k_max give the Python-float results.
  ref = _run(lp, old, a, mask, key)
  np.testing.assert_allclose(out1[0][0], ref["ppo", "token-mean"][0], rtol=1e-6)
  np.testing.assert_allclose(out1[1][0], ref["clip_cov", "token-mean"][0], rtol=1e-6)
  np.testing.assert_allclose(out1[2][0], ref["kl_cov", "token-mean"][0], rtol=1e-6)


def test_sharded_batch_gives_the_single_device_result(batch, result):
  """Selection over a batch sharded on a 6-device mesh equals the one-device one."""
  from jax.sharding import NamedSharding, PartitionSpec as P
  from jaxent.sharding import make_mesh
  lp, old, a, mask, key = batch
  mesh = make_mesh(data=3, fsdp=2, devices=jax.devices()[:6])
  rows = NamedSharding(mesh, P(("data", "fsdp")))

  @jax.jit
  def f(lp, old, a, mask, key):
    cc = lambda lp: losses.clip_cov(lp, old, a, mask, key=key, ratio=RATIO, cov_lb=LB,
                                    cov_ub=UB, clip_low=CL, clip_high=CH)
    kc = lambda lp: losses.kl_cov(lp, old, a, mask, ratio=RATIO, kl_coef=BETA)
    return (jax.value_and_grad(cc, has_aux=True)(lp), jax.value_and_grad(kc, has_aux=True)(lp))

  with jax.set_mesh(mesh):
    (cc, g_cc), (kc, g_kc) = f(*[jax.device_put(x, rows) for x in (lp, old, a, mask)], key)
  assert g_kc.sharding.spec == rows.spec  # gradients stay sharded like the batch
  for (loss, m), g, name in ((cc, g_cc, "clip_cov"), (kc, g_kc, "kl_cov")):
    ref_loss, ref_g, ref_m = result[name, "token-mean"]
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    np.testing.assert_allclose(g, ref_g, rtol=1e-6, atol=1e-9)
    np.testing.assert_array_equal(m["num_selected"], ref_m["num_selected"])


# ---------------------------------------------------------------- regularizers
def test_kl_penalty_kinds_and_entropy_bonus_match_numpy(batch):
  lp, ref, _, mask, _ = batch
  m = np.asarray(mask, bool)
  delta = np.asarray(lp, np.float64) - np.asarray(ref, np.float64)
  x = np.clip(-delta, -20, 20)
  want = {"k1": delta, "k2": 0.5 * delta**2, "k3": np.clip(np.exp(x) - x - 1, -10, 10)}

  @jax.jit
  def all_kinds(lp, ref, mask):
    return {k: losses.kl_penalty(lp, ref, mask, kind=k, agg="seq-mean-token-mean")
            for k in losses.KL_KINDS}

  got = all_kinds(lp, ref, mask)
  w = np_weights(m, "seq-mean-token-mean")
  for k in losses.KL_KINDS:
    np.testing.assert_allclose(got[k][0], (w * want[k]).sum(), rtol=1e-5, err_msg=k)
  # k3 clamps: the huge log-ratio at [0, 0] contributes exactly 10.
  assert want["k3"][0, 0] == 10
  loss, metrics = jax.jit(lambda h, m: losses.entropy_bonus(h, m))(-lp, mask)
  np.testing.assert_allclose(metrics["entropy"], np_mean(-np.asarray(lp), m), rtol=1e-6)
  np.testing.assert_allclose(loss, -metrics["entropy"])


# ---------------------------------------------------------------- bad input
def test_bad_input_raises_value_error_naming_the_argument():
  x = jnp.zeros((2, 3))
  key = jax.random.key(0)
  cases = [
      (lambda: losses.ppo_clip(x, jnp.zeros((2, 4)), x, x), "old_log_prob"),
      (lambda: losses.ppo_clip(x, x, x, jnp.zeros((3, 3))), "mask"),
      (lambda: losses.ppo_clip(jnp.zeros(3), jnp.zeros(3), jnp.zeros(3), jnp.zeros(3)),
       "log_prob"),
      (lambda: losses.ppo_clip(x, x, x, x, agg="sum"), "agg must be one of .*token-mean"),
      (lambda: losses.ppo_clip(x, x, x, x, clip_low=-0.1), "clip_low"),
      (lambda: losses.ppo_clip(x, x, x, x, clip_high=-1.0), "clip_high"),
      (lambda: losses.ppo_clip(x, x, x, x, dual_clip=1.0), "dual_clip"),
      (lambda: losses.kl_cov(x, x, x, x, ratio=0.0), "ratio"),
      (lambda: losses.kl_cov(x, x, x, x, ratio=1.5), "ratio"),
      (lambda: losses.kl_cov(x, x, x, x, kl_coef=-1.0), "kl_coef"),
      (lambda: losses.kl_cov(x, x, x, x, selection=jnp.zeros((2, 2), bool)), "selection"),
      (lambda: losses.clip_cov(x, x, x, x, key=None), "key"),
      (lambda: losses.clip_cov(x, x, x, x, key=key, cov_lb=5.0, cov_ub=1.0), "cov_lb"),
      (lambda: losses.select_kl_cov(x, x, x, ratio=jnp.float32(0.1)), "pass k_max"),
      (lambda: losses.select_kl_cov(x, x, x, ratio=0.1, k_max=0), "k_max"),
      (lambda: losses.kl_penalty(x, x, x, kind="k4"), "kind"),
      (lambda: losses.entropy_bonus(x, x, agg="mean"), "agg"),
  ]
  for fn, match in cases:
    with pytest.raises(ValueError, match=match):
      fn()
  with pytest.raises(ValueError, match="pass k_max"):  # also inside jit, at trace time
    jax.jit(lambda r: losses.kl_cov(x, x, x, x, ratio=r))(0.1)
