"""Layer 2: pure policy losses and their registry, rollout correction, token masks, regularizers.

Policy losses: PPO-clip, Clip-Cov, KL-Cov, GSPO, CISPO, GMPO (each takes
optional detached importance ``weights``); ``rollout_correction`` (TIS,
IcePop, rejection masks); ``top_entropy_mask``; ``adaptive_entropy``.
``POLICY_LOSSES`` maps each ``loss.name`` to its ``PolicyLoss`` entry.

Every function takes ``[batch, time]`` response-token arrays and a mask, is
jit-able with static shapes, never syncs with the host and returns
``(loss, metrics)`` (the ``select_*`` functions return a bool ``[B, T]`` mask).
"""
from jaxent.losses._correction import LEVELS, REJECTION_OPTIONS, rollout_correction
from jaxent.losses._covariance import select_clip_cov, select_kl_cov, token_covariance
from jaxent.losses._entropy import (AdaptiveEntropy, AdaptiveEntropyState, adaptive_entropy,
                                    top_entropy_mask)
from jaxent.losses._families import cispo, gmpo, gspo
from jaxent.losses._policy import clip_cov, kl_cov, ppo_clip
from jaxent.losses._registry import (POLICY_LOSSES, PolicyInputs, PolicyLoss, agg_norms, policy_loss,
                                     register_policy_loss)
from jaxent.losses._regularizers import KL_KINDS, entropy_bonus, kl_penalty
from jaxent.ops import AGG_MODES, aggregate

__all__ = [
    "AGG_MODES",
    "KL_KINDS",
    "LEVELS",
    "POLICY_LOSSES",
    "REJECTION_OPTIONS",
    "AdaptiveEntropy",
    "AdaptiveEntropyState",
    "PolicyInputs",
    "PolicyLoss",
    "adaptive_entropy",
    "agg_norms",
    "aggregate",
    "cispo",
    "clip_cov",
    "entropy_bonus",
    "gmpo",
    "gspo",
    "kl_cov",
    "kl_penalty",
    "policy_loss",
    "ppo_clip",
    "register_policy_loss",
    "rollout_correction",
    "select_clip_cov",
    "select_kl_cov",
    "token_covariance",
    "top_entropy_mask",
]
