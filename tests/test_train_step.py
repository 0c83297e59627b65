"""The update step: micro-batch invariance, selection scope, optimizer, non-finite skipping."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxent import losses, models
from jaxent.config import AdaptiveEntropyConfig, CorrectionConfig, LossConfig, OptimConfig
from jaxent.train import _step as S
from jaxent.types import Batch
from tests._tiny import random_batch

CFG = models.ModelConfig(model_type="qwen2", vocab_size=17, hidden_size=32, num_layers=2, num_heads=4,
                         num_kv_heads=2, head_dim=8, intermediate_size=64, tie_word_embeddings=True)
B, P, R = 16, 8, 6


@functools.lru_cache(maxsize=None)
def _params():
  return models.init_model(CFG, seed=0).params


def _batch(seed=0) -> Batch:
  return jax.tree.map(jnp.asarray, random_batch(CFG.vocab_size, B, P, R, seed))


SGD = optax.sgd(1.0)   # lr 1, no momentum: the parameter change is the gradient
ADAMW = S.make_optimizer(OptimConfig(lr=1e-2, grad_clip=1e9), total_updates=10)


def _corrected_batch(seed=0) -> Batch:
  """A batch whose sampler log-probs drift from the trainer's by up to ~0.7 nats."""
  b = _batch(seed)
  drift = jax.random.normal(jax.random.PRNGKey(seed + 100), b.old_log_prob.shape) * 0.35
  return b._replace(rollout_log_prob=(b.old_log_prob + drift) * b.response_mask)


@functools.lru_cache(maxsize=None)
def _step_fn(loss_cfg, micro, tx, correction=None):
  spec = S.StepSpec(model=CFG, loss=loss_cfg, micro_batches=micro, correction=correction)
  return jax.jit(functools.partial(S.train_step_impl, spec, tx))


def _run(loss_cfg, micro, batch=None, tx=ADAMW, correction=None, state=None):
  if state is None:
    state = S.init_state(jax.tree.map(jnp.copy, _params()), tx, jax.random.PRNGKey(7), loss_cfg)
  if batch is None:
    batch = _batch() if correction is None else _corrected_batch()
  return _step_fn(loss_cfg, micro, tx, correction)(state, batch)


TIS_GEO = CorrectionConfig(level="token", threshold=1.5, rejection="seq_mean_k1:0.7_1.4")
MICRO = {"clip_cov": (4,), "kl_cov": (2, 4, 8), "ppo_seqmean_entropy_refkl": (4,),
         "gspo": (4,), "cispo": (4,), "gmpo": (4,), "ppo_entropy_mask": (4,),
         "clip_cov_entropy_mask_tis": (4,)}
ALL_MICRO = (2, 4, 8)
LOSS_CASES = {
    "clip_cov": LossConfig(name="clip_cov", ratio=0.2, cov_lb=-1e9, cov_ub=1e9),
    "kl_cov": LossConfig(name="kl_cov", ratio=0.2, kl_coef=1.0),
    "ppo_seqmean_entropy_refkl": LossConfig(name="ppo_clip", clip_high=0.28, dual_clip=3.0,
                                            agg="seq-mean-token-mean", entropy_coef=0.01,
                                            ref_kl_coef=0.1),
    "gspo": LossConfig(name="gspo", agg="seq-mean-token-mean", clip_low=0.1, clip_high=0.1),
    "cispo": LossConfig(name="cispo", clip_low=0.1, clip_high=0.1),
    "gmpo": LossConfig(name="gmpo", clip_low=0.2, clip_high=0.2),
    "ppo_entropy_mask": LossConfig(name="ppo_clip", top_entropy_quantile=0.3),
    "clip_cov_entropy_mask_tis": LossConfig(name="clip_cov", ratio=0.2, cov_lb=-1e9, cov_ub=1e9,
                                            top_entropy_quantile=0.5),
}
CORRECTION = {"clip_cov_entropy_mask_tis": TIS_GEO}
PPO = LossConfig(name="ppo_clip")


@pytest.mark.parametrize("name", list(LOSS_CASES))
def test_update_does_not_depend_on_micro_batch_count(name):
  """Selection spans the mini-batch; normalisers are mini-batch-wide: 1 and 4 agree
  (kl_cov: 1, 2, 4, 8; every case with 2, 4, 8 in the slow run)."""
  _check_micro_batch_counts(name, MICRO[name])


@pytest.mark.slow
@pytest.mark.parametrize("name", list(LOSS_CASES))
def test_update_does_not_depend_on_micro_batch_count_2_4_8(name):
  _check_micro_batch_counts(name, ALL_MICRO)


def _check_micro_batch_counts(name, counts):
  """SGD with lr 1 makes the parameter change the gradient itself (Adam would
  turn float noise in near-zero gradients into full-size steps)."""
  corr = CORRECTION.get(name)
  ref_state, ref_m = _run(LOSS_CASES[name], 1, tx=SGD, correction=corr)
  g_ref = [p0 - p1 for p0, p1 in zip(jax.tree.leaves(_params()), jax.tree.leaves(ref_state.params))]
  scale = max(float(jnp.abs(g).max()) for g in g_ref)
  assert scale > 1e-4                                   # a real gradient, not a trivially zero one
  for micro in counts:
    st, m = _run(LOSS_CASES[name], micro, tx=SGD, correction=corr)
    g = [p0 - p1 for p0, p1 in zip(jax.tree.leaves(_params()), jax.tree.leaves(st.params))]
    for a, b in zip(g_ref, g):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * scale)
    for k in ("loss", "grad_norm", "clipfrac", "approx_kl", "entropy", "log_prob"):
      np.testing.assert_allclose(ref_m[k], m[k], rtol=2e-4, atol=1e-6, err_msg=k)
    for k in ("selected_frac", "entropy_mask_kept_frac", "rc_masked_frac"):
      if k in ref_m:
        np.testing.assert_allclose(ref_m[k], m[k], atol=1e-7, err_msg=k)


def test_gradient_matches_a_direct_loss_on_the_whole_batch():
  """The step's gradient equals jax.grad of the public loss over the whole mini-batch."""
  lc = LOSS_CASES["kl_cov"]
  spec = S.StepSpec(model=CFG, loss=lc, micro_batches=4)  # response_logprobs needs only the model
  batch = _batch()

  def direct(params):
    lp, _ = S.response_logprobs(spec, params, batch)
    sel = losses.select_kl_cov(jax.lax.stop_gradient(lp), batch.advantages, batch.response_mask,
                               ratio=lc.ratio)
    loss, _ = losses.kl_cov(lp, batch.old_log_prob, batch.advantages, batch.response_mask,
                            ratio=lc.ratio, kl_coef=lc.kl_coef, selection=sel)
    return loss

  g_ref = jax.grad(direct)(_params())
  new, _ = _run(lc, 4, batch=batch, tx=SGD)
  for p0, p1, g in zip(jax.tree.leaves(_params()), jax.tree.leaves(new.params), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(p0 - p1, g, rtol=1e-4, atol=1e-7)


def test_entropy_mask_and_correction_compose_like_the_public_functions():
  """GSPO with rollout correction and the top-entropy mask, 4 micro-batches, equals
  jax.grad of the public functions composed by hand on the whole mini-batch."""
  lc = LossConfig(name="gspo", clip_low=0.1, clip_high=0.1, top_entropy_quantile=0.4)
  spec = S.StepSpec(model=CFG, loss=lc, micro_batches=4)
  batch = _corrected_batch(1)
  w, keep = losses.rollout_correction(batch.old_log_prob, batch.rollout_log_prob, batch.response_mask,
                                      level="token", threshold=1.5, rejection="seq_mean_k1:0.7_1.4")
  mask = keep.astype(jnp.float32)
  assert 0 < float((batch.response_mask - mask).sum()) < float(batch.response_mask.sum())  # rows rejected

  def direct(params):
    lp, ent = S.response_logprobs(spec, params, batch)
    top = losses.top_entropy_mask(jax.lax.stop_gradient(ent), mask, quantile=0.4)
    loss, _ = losses.gspo(lp, batch.old_log_prob, batch.advantages, mask, clip_low=0.1, clip_high=0.1,
                          agg="token-mean", weights=w * top)
    return loss

  g_ref = jax.grad(direct)(_params())
  assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(g_ref)) > 1e-4
  new, m = _run(lc, 4, batch=batch, tx=SGD, correction=TIS_GEO)
  for p0, p1, g in zip(jax.tree.leaves(_params()), jax.tree.leaves(new.params), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(p0 - p1, g, rtol=1e-4, atol=1e-7)
  valid = np.asarray(batch.response_mask) > 0
  np.testing.assert_allclose(m["rc_masked_frac"], (valid & ~np.asarray(keep)).sum() / valid.sum(), rtol=1e-6)
  np.testing.assert_allclose(m["rc_weight_max"], np.asarray(w)[valid].max(), rtol=1e-6)
  np.testing.assert_allclose(m["rc_weight_mean"], np.asarray(w)[valid].mean(), rtol=1e-6)
  # about 40% of the kept tokens train (ties aside), counted against the kept tokens
  assert 0.3 < float(m["entropy_mask_kept_frac"]) < 0.5


def test_adaptive_entropy_coefficient_follows_the_rule_and_acts_from_the_next_step():
  target = 2.0
  lc = LossConfig(name="ppo_clip", entropy_coef=0.05,
                  adaptive_entropy=AdaptiveEntropyConfig(target=target, delta=0.01, min=0.0, max=0.06))
  plain = LossConfig(name="ppo_clip")
  state = S.init_state(jax.tree.map(jnp.copy, _params()), SGD, jax.random.PRNGKey(7), lc)
  coef, applied, h_prev = 0.05, 0.0, np.inf
  for step in range(4):
    # the same state through the loss without the bonus gives pg_loss alone
    _, m_plain = _run(plain, 2, tx=SGD, state=S.init_state(state.params, SGD, state.key, plain))
    state, m = _run(lc, 2, tx=SGD, state=state)
    np.testing.assert_allclose(m["entropy_coef"], applied, rtol=1e-6)
    # the bonus is -applied * token-mean entropy
    np.testing.assert_allclose(m["loss"], m_plain["loss"] - applied * m["entropy"], rtol=1e-5, atol=1e-6)
    h = float(m["entropy"])
    coef = min(coef + 0.01, 0.06) if h <= target else max(coef - 0.01, 0.0)
    applied = coef if h <= target else 0.0
    np.testing.assert_allclose(state.loss_state.coef, coef, rtol=1e-6)
    np.testing.assert_allclose(state.loss_state.last_entropy, h, rtol=1e-6)
    h_prev = h
    del h_prev
  assert applied > 0          # the tiny model's entropy (< log 17 = 2.83) is under... the target


def test_bad_rollout_correction_is_a_config_error_naming_the_field():
  from jaxent.errors import ConfigError
  with pytest.raises(ConfigError, match="rollout.correction: .*threshold"):
    S.StepSpec(model=CFG, loss=PPO, correction=CorrectionConfig(threshold="abc"))
  with pytest.raises(ConfigError, match="rollout.correction: .*seq_median_k1"):
    S.StepSpec(model=CFG, loss=PPO, correction=CorrectionConfig(rejection="seq_median_k1:0.5_2"))


def test_nonfinite_update_is_skipped_and_counted():
  batch = _batch()
  bad = batch._replace(advantages=batch.advantages.at[0, 0].set(jnp.nan))  # a valid token
  st, m = _run(PPO, 2, batch=bad)
  assert int(m["skipped"]) == 1 and int(m["nonfinite_in_a_row"]) == 1
  for a, b in zip(jax.tree.leaves(_params()), jax.tree.leaves(st.params)):
    np.testing.assert_array_equal(a, b)                # parameters untouched
  # NaN in a masked position changes nothing
  masked_nan = batch._replace(old_log_prob=batch.old_log_prob.at[3, 0].set(jnp.nan))
  st2, m2 = _run(PPO, 2, batch=masked_nan)
  st1, _ = _run(PPO, 2)
  assert int(m2["skipped"]) == 0
  for a, b in zip(jax.tree.leaves(st1.params), jax.tree.leaves(st2.params)):
    np.testing.assert_array_equal(a, b)


def test_optimizer_schedule_and_clipping():
  tx = S.make_optimizer(OptimConfig(lr=1.0, warmup_steps=2, grad_clip=0.5, b1=0.0, b2=0.0, eps=1e-12),
                        total_updates=5)
  p = {"w": jnp.array([0.0, 0.0])}
  st = tx.init(p)
  g = {"w": jnp.array([3.0, 4.0])}                     # norm 5 -> clipped to 0.5
  u, st = tx.update(g, st, p)
  np.testing.assert_allclose(u["w"], 0.0, atol=1e-7)   # warm-up starts at lr 0
  u, st = tx.update(g, st, p)
  # Adam with b1=b2=0 is sign-like: lr(1)=0.5 -> |u| = 0.5
  np.testing.assert_allclose(np.abs(u["w"]), [0.5, 0.5], rtol=1e-5)
