"""The update step: micro-batch invariance, selection scope, optimizer, non-finite skipping."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxent import losses, models
from jaxent.config import LossConfig, OptimConfig
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


@functools.lru_cache(maxsize=None)
def _step_fn(loss_cfg, micro, tx):
  spec = S.StepSpec(model=CFG, loss=loss_cfg, micro_batches=micro)
  return jax.jit(functools.partial(S.train_step_impl, spec, tx))


def _run(loss_cfg, micro, batch=None, tx=ADAMW):
  state = S.init_state(jax.tree.map(jnp.copy, _params()), tx, jax.random.PRNGKey(7))
  return _step_fn(loss_cfg, micro, tx)(state, _batch() if batch is None else batch)


MICRO = {"clip_cov": (4,), "kl_cov": (2, 4, 8), "ppo_seqmean_entropy_refkl": (4,)}
LOSS_CASES = {
    "clip_cov": LossConfig(name="clip_cov", ratio=0.2, cov_lb=-1e9, cov_ub=1e9),
    "kl_cov": LossConfig(name="kl_cov", ratio=0.2, kl_coef=1.0),
    "ppo_seqmean_entropy_refkl": LossConfig(name="ppo_clip", clip_high=0.28, dual_clip=3.0,
                                            agg="seq-mean-token-mean", entropy_coef=0.01,
                                            ref_kl_coef=0.1),
}
PPO = LossConfig(name="ppo_clip")


@pytest.mark.parametrize("name", list(LOSS_CASES))
def test_update_does_not_depend_on_micro_batch_count(name):
  """Selection spans the mini-batch; normalisers are mini-batch-wide: 1, 2, 4, 8 agree.

  SGD with lr 1 makes the parameter change the gradient itself (Adam would
  turn float noise in near-zero gradients into full-size steps).
  """
  ref_state, ref_m = _run(LOSS_CASES[name], 1, tx=SGD)
  g_ref = [p0 - p1 for p0, p1 in zip(jax.tree.leaves(_params()), jax.tree.leaves(ref_state.params))]
  scale = max(float(jnp.abs(g).max()) for g in g_ref)
  assert scale > 1e-4                                   # a real gradient, not a trivially zero one
  for micro in MICRO[name]:
    st, m = _run(LOSS_CASES[name], micro, tx=SGD)
    g = [p0 - p1 for p0, p1 in zip(jax.tree.leaves(_params()), jax.tree.leaves(st.params))]
    for a, b in zip(g_ref, g):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * scale)
    for k in ("loss", "grad_norm", "clipfrac", "approx_kl", "entropy", "log_prob"):
      np.testing.assert_allclose(ref_m[k], m[k], rtol=2e-4, atol=1e-6, err_msg=k)
    if "selected_frac" in ref_m:
      np.testing.assert_allclose(ref_m["selected_frac"], m["selected_frac"], atol=1e-7)


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
