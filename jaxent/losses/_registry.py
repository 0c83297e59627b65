"""The policy-loss registry: one entry per ``loss.name``.

A family is a pure loss function plus, for the token-selecting ones, a
selection function. The trainer looks the family up by name, runs the
selection once over the whole mini-batch when the family has one, and calls
the loss on each micro-batch with that selection and mini-batch-wide
normalisers. Adding a family is a pure function, one ``register_policy_loss``
call and its name in ``jaxent.config.LOSSES``.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax

from jaxent.losses._covariance import select_clip_cov, select_kl_cov
from jaxent.losses._policy import clip_cov, kl_cov, ppo_clip


class PolicyInputs(NamedTuple):
  """The per-token arrays every policy loss reads, ``[B, T]`` each."""
  log_prob: jax.Array          # log pi_theta of the response tokens (differentiated)
  old_log_prob: jax.Array      # log pi_old (the rollout policy as the trainer recomputes it)
  advantages: jax.Array        # per-token advantages
  mask: jax.Array              # 1 on response tokens, 0 on padding


# loss(cfg, inputs, selection, norms) -> (loss, metrics); ``norms`` are the
# mini-batch-wide ``num_tokens`` / ``num_seqs`` / ``max_len`` keyword arguments.
LossFn = Callable[[Any, PolicyInputs, "jax.Array | None", dict], "tuple[jax.Array, dict]"]
# select(cfg, inputs, key) -> bool [B, T]; ``inputs.log_prob`` carries no gradient.
SelectFn = Callable[[Any, PolicyInputs, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class PolicyLoss:
  """A policy-loss family: its loss and, if it selects tokens, its selection."""
  name: str
  loss: LossFn
  select: SelectFn | None = None


POLICY_LOSSES: dict[str, PolicyLoss] = {}


def register_policy_loss(family: PolicyLoss) -> PolicyLoss:
  """Adds ``family`` under ``family.name``; a name registers once."""
  if family.name in POLICY_LOSSES:
    raise ValueError(f"policy loss {family.name!r} is already registered")
  POLICY_LOSSES[family.name] = family
  return family


def policy_loss(name: str) -> PolicyLoss:
  """The registered family called ``name``."""
  try:
    return POLICY_LOSSES[name]
  except KeyError:
    raise ValueError(f"unknown policy loss {name!r}; known: {sorted(POLICY_LOSSES)}") from None


def _ppo_clip(cfg, x: PolicyInputs, selection, norms):
  del selection
  return ppo_clip(*x, clip_low=cfg.clip_low, clip_high=cfg.clip_high, dual_clip=cfg.dual_clip,
                  agg=cfg.agg, **norms)


def _clip_cov(cfg, x: PolicyInputs, selection, norms):
  return clip_cov(*x, key=None, ratio=cfg.ratio, cov_lb=cfg.cov_lb, cov_ub=cfg.cov_ub,
                  clip_low=cfg.clip_low, clip_high=cfg.clip_high, selection=selection,
                  agg=cfg.agg, **norms)


def _select_clip_cov(cfg, x: PolicyInputs, key):
  return select_clip_cov(x.log_prob, x.old_log_prob, x.advantages, x.mask, key=key, ratio=cfg.ratio,
                         cov_lb=cfg.cov_lb, cov_ub=cfg.cov_ub, clip_low=cfg.clip_low,
                         clip_high=cfg.clip_high)


def _kl_cov(cfg, x: PolicyInputs, selection, norms):
  return kl_cov(*x, ratio=cfg.ratio, kl_coef=cfg.kl_coef, selection=selection, agg=cfg.agg, **norms)


def _select_kl_cov(cfg, x: PolicyInputs, key):
  del key
  return select_kl_cov(x.log_prob, x.advantages, x.mask, ratio=cfg.ratio)


register_policy_loss(PolicyLoss("ppo_clip", _ppo_clip))
register_policy_loss(PolicyLoss("clip_cov", _clip_cov, _select_clip_cov))
register_policy_loss(PolicyLoss("kl_cov", _kl_cov, _select_kl_cov))
