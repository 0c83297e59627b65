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
from jaxent.losses._families import cispo, gmpo, gspo
from jaxent.losses._policy import clip_cov, kl_cov, ppo_clip


class PolicyInputs(NamedTuple):
  """The per-token arrays every policy loss reads, ``[B, T]`` each."""
  log_prob: jax.Array          # log pi_theta of the response tokens (differentiated)
  old_log_prob: jax.Array      # log pi_old (the rollout policy as the trainer recomputes it)
  advantages: jax.Array        # per-token advantages
  mask: jax.Array              # 1 on response tokens, 0 on padding
  weights: jax.Array | None = None  # detached per-token weights multiplying the per-token loss

  @property
  def tokens(self) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """The four positional arguments of every policy loss."""
    return self.log_prob, self.old_log_prob, self.advantages, self.mask


# loss(cfg, inputs, selection, norms) -> (loss, metrics); ``norms`` holds the
# mini-batch-wide ``num_tokens`` / ``num_seqs`` / ``max_len`` (the aggregation's
# normalisers) and ``num_rows`` (the row count).
LossFn = Callable[[Any, PolicyInputs, "jax.Array | None", dict], "tuple[jax.Array, dict]"]
# select(cfg, inputs, key) -> bool [B, T]; ``inputs.log_prob`` carries no gradient.
SelectFn = Callable[[Any, PolicyInputs, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class PolicyLoss:
  """A policy-loss family: its loss and, if it selects tokens, its selection.

  ``clip`` is the family's (clip_low, clip_high) when the config leaves them null.
  """
  name: str
  loss: LossFn
  select: SelectFn | None = None
  clip: tuple[float, float] = (0.2, 0.2)


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


AGG_NORMS = ("num_tokens", "num_seqs", "max_len")


def agg_norms(norms: dict) -> dict:
  """The aggregation's normalisers out of ``norms``."""
  return {k: norms[k] for k in AGG_NORMS if k in norms}


def clip_of(cfg, family: PolicyLoss | str) -> tuple[float, float]:
  """``(clip_low, clip_high)`` of ``cfg``, the family's defaults where null."""
  if isinstance(family, str):
    family = policy_loss(family)
  lo, hi = family.clip
  return (lo if cfg.clip_low is None else cfg.clip_low,
          hi if cfg.clip_high is None else cfg.clip_high)


def _ppo_clip(cfg, x: PolicyInputs, selection, norms):
  del selection
  lo, hi = clip_of(cfg, "ppo_clip")
  return ppo_clip(*x.tokens, clip_low=lo, clip_high=hi, dual_clip=cfg.dual_clip, agg=cfg.agg,
                  weights=x.weights, **agg_norms(norms))


def _clip_cov(cfg, x: PolicyInputs, selection, norms):
  lo, hi = clip_of(cfg, "clip_cov")
  return clip_cov(*x.tokens, key=None, ratio=cfg.ratio, cov_lb=cfg.cov_lb, cov_ub=cfg.cov_ub,
                  clip_low=lo, clip_high=hi, selection=selection, agg=cfg.agg, weights=x.weights,
                  **agg_norms(norms))


def _select_clip_cov(cfg, x: PolicyInputs, key):
  lo, hi = clip_of(cfg, "clip_cov")
  return select_clip_cov(*x.tokens, key=key, ratio=cfg.ratio, cov_lb=cfg.cov_lb, cov_ub=cfg.cov_ub,
                         clip_low=lo, clip_high=hi)


def _kl_cov(cfg, x: PolicyInputs, selection, norms):
  return kl_cov(*x.tokens, ratio=cfg.ratio, kl_coef=cfg.kl_coef, selection=selection, agg=cfg.agg,
                weights=x.weights, **agg_norms(norms))


def _select_kl_cov(cfg, x: PolicyInputs, key):
  del key
  return select_kl_cov(x.log_prob, x.advantages, x.mask, ratio=cfg.ratio)


def _gspo(cfg, x: PolicyInputs, selection, norms):
  del selection
  lo, hi = clip_of(cfg, "gspo")
  return gspo(*x.tokens, clip_low=lo, clip_high=hi, agg=cfg.agg, weights=x.weights, **agg_norms(norms))


def _cispo(cfg, x: PolicyInputs, selection, norms):
  del selection
  lo, hi = clip_of(cfg, "cispo")
  return cispo(*x.tokens, clip_low=lo, clip_high=hi, agg=cfg.agg, weights=x.weights, **agg_norms(norms))


def _gmpo(cfg, x: PolicyInputs, selection, norms):
  """GMPO averages over every row of the mini-batch; ``agg`` does not apply."""
  del selection
  lo, hi = clip_of(cfg, "gmpo")
  return gmpo(*x.tokens, clip_low=lo, clip_high=hi, weights=x.weights,
              num_tokens=norms.get("num_tokens"), num_rows=norms.get("num_rows"))


register_policy_loss(PolicyLoss("ppo_clip", _ppo_clip))
register_policy_loss(PolicyLoss("clip_cov", _clip_cov, _select_clip_cov))
register_policy_loss(PolicyLoss("kl_cov", _kl_cov, _select_kl_cov))
register_policy_loss(PolicyLoss("gspo", _gspo, clip=(3e-4, 4e-4)))
register_policy_loss(PolicyLoss("cispo", _cispo))
register_policy_loss(PolicyLoss("gmpo", _gmpo, clip=(0.4, 0.4)))
