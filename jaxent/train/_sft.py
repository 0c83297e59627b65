"""Supervised warm start: maximise log pi(answer | prompt) on response tokens.

Used by the demo to give the RL phase a policy that already solves part of
the task (RL from scratch on a random policy sees no reward signal).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from jaxent.train._step import StepSpec, response_logprobs
from jaxent.types import Batch


def sft_loss(spec: StepSpec, params, batch: Batch):
  """Mean negative log-likelihood per response token."""
  lp, _ = response_logprobs(spec, params, batch)
  m = batch.response_mask
  n = jnp.maximum(m.sum(), 1.0)
  return -jnp.where(m > 0, lp, 0.0).sum() / n


def make_sft_step(spec: StepSpec, tx: optax.GradientTransformation):
  """Jitted ``(params, opt_state, batch) -> (params, opt_state, loss)``, params donated."""
  def step(params, opt_state, batch):
    loss, g = jax.value_and_grad(functools.partial(sft_loss, spec))(params, batch)
    updates, opt_state = tx.update(g, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss
  jitted = jax.jit(step, donate_argnums=(0, 1))
  jitted.__wrapped__ = step  # the pure step, for callers that scan it inside their own jit
  return jitted
