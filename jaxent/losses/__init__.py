"""Layer 2: pure policy losses (PPO-clip, Clip-Cov, KL-Cov), their registry, and regularizers.

Every function takes ``[batch, time]`` response-token arrays and a mask, is
jit-able with static shapes, never syncs with the host and returns
``(loss, metrics)`` (the ``select_*`` functions return a bool ``[B, T]`` mask).
"""
from jaxent.losses._covariance import select_clip_cov, select_kl_cov, token_covariance
from jaxent.losses._policy import clip_cov, kl_cov, ppo_clip
from jaxent.losses._registry import POLICY_LOSSES, PolicyInputs, PolicyLoss, policy_loss, register_policy_loss
from jaxent.losses._regularizers import KL_KINDS, entropy_bonus, kl_penalty
from jaxent.ops import AGG_MODES, aggregate

__all__ = [
    "AGG_MODES",
    "KL_KINDS",
    "POLICY_LOSSES",
    "PolicyInputs",
    "PolicyLoss",
    "aggregate",
    "clip_cov",
    "entropy_bonus",
    "kl_cov",
    "kl_penalty",
    "policy_loss",
    "ppo_clip",
    "register_policy_loss",
    "select_clip_cov",
    "select_kl_cov",
    "token_covariance",
]
