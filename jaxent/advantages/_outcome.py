"""Outcome advantages for group sampling: GRPO (and Dr.GRPO) and RLOO.

Each prompt is answered ``n`` times; the responses sharing a prompt form a
group, named by an integer id in ``[0, num_groups)``. Groups are reduced with
segment sums of static size ``num_groups``, so the functions jit with static
shapes whatever the group sizes (they may differ, e.g. after filtering).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxent.ops import (as_valid, check_float, check_ndim, check_scalar, check_shapes,
                        upcast)


def _check(scores, group_ids, num_groups, valid):
  check_ndim("scores", scores, 1, "a [batch] array of per-response scores")
  check_float("scores", scores)
  check_shapes("scores", scores, group_ids=group_ids, valid=valid)
  if not jnp.issubdtype(jnp.result_type(group_ids), jnp.integer):
    raise ValueError(f"group_ids must be an integer array, got dtype {jnp.result_type(group_ids)}")
  if not isinstance(num_groups, int) or isinstance(num_groups, bool) or num_groups < 1:
    raise ValueError(f"num_groups must be a positive Python int (static), got {num_groups!r}")


def _group_stats(scores, group_ids, num_groups, valid):
  """Masked scores, ids, valid flags, and each response's group size and sum."""
  ok = jnp.ones(scores.shape, bool) if valid is None else as_valid(valid)
  s = jnp.where(ok, upcast(scores), 0)
  ids = jnp.asarray(group_ids, jnp.int32)
  count = jax.ops.segment_sum(ok.astype(s.dtype), ids, num_segments=num_groups)
  total = jax.ops.segment_sum(s, ids, num_segments=num_groups)
  return s, ids, ok, count[ids], total[ids]


def grpo(scores: jax.Array, group_ids: jax.Array, *, num_groups: int, eps=1e-6,
         scale_by_std: bool = True, valid: jax.Array | None = None) -> jax.Array:
  """GRPO outcome advantage ``(s − mean_g)/(std_g + ε)``, per response.

  ``mean_g`` and the unbiased ``std_g`` (divisor ``n − 1``) run over the
  response's group. A group of one has ``mean = 0`` and ``std = 1`` (as the
  reference), so its advantage is ``s/(1 + ε)`` (``s`` without scaling).
  ``scale_by_std=False`` gives Dr.GRPO's ``s − mean_g``.

  Args:
    scores: float ``[B]``, one score per response (e.g. ``sequence_scores``).
    group_ids: int ``[B]`` in ``[0, num_groups)`` (not checked: they may be
      traced; an id outside gives an undefined result for that response).
    num_groups: static number of groups.
    eps: ε ≥ 0 added to the std.
    scale_by_std: static; divide by ``std_g + ε`` (GRPO) or not (Dr.GRPO).
    valid: optional bool ``[B]``; invalid responses (padding rows) take no
      part in any group and get advantage 0.

  Returns:
    float32 ``[B]``.
  """
  _check(scores, group_ids, num_groups, valid)
  check_scalar("eps", eps, low=0)
  s, ids, ok, n, total = _group_stats(scores, group_ids, num_groups, valid)
  single = n <= 1
  mean = jnp.where(single, 0, total / jnp.maximum(n, 1))
  # Two passes (mean, then centred squares): one-pass E[s²]−E[s]² cancels
  # catastrophically when the scores share a large offset.
  sq = jax.ops.segment_sum(jnp.where(ok, jnp.square(s - mean), 0), ids, num_segments=num_groups)
  var = sq[ids] / jnp.maximum(n - 1, 1)
  std = jnp.where(single, 1, jnp.sqrt(var))
  adv = s - mean
  if scale_by_std:
    # With eps = 0 a group of equal scores has std 0 and s − mean = 0: give 0, not 0/0.
    den = std + eps
    adv = jnp.where(den > 0, adv / jnp.where(den > 0, den, 1), 0)
  return jnp.where(ok, adv, 0)


def rloo(scores: jax.Array, group_ids: jax.Array, *, num_groups: int,
         valid: jax.Array | None = None) -> jax.Array:
  """RLOO advantage: ``s_i − mean_{j≠i} s_j = n/(n−1)·(s_i − mean_g)``.

  A group of one has no other response; its baseline is 0 and its advantage
  ``s`` (as verl's RLOO estimator).

  Args:
    scores, group_ids, num_groups, valid: as in ``grpo``.

  Returns:
    float32 ``[B]``.
  """
  _check(scores, group_ids, num_groups, valid)
  s, _, ok, n, total = _group_stats(scores, group_ids, num_groups, valid)
  others = (total - s) / jnp.maximum(n - 1, 1)
  adv = jnp.where(n <= 1, s, s - others)
  return jnp.where(ok, adv, 0)


def sequence_scores(token_rewards: jax.Array, mask: jax.Array) -> jax.Array:
  """A response's score: the sum of its token rewards over valid tokens, ``[B]``."""
  check_ndim("token_rewards", token_rewards, 2, "a [batch, time] array")
  check_shapes("token_rewards", token_rewards, mask=mask)
  return jnp.sum(jnp.where(as_valid(mask), upcast(token_rewards), 0), axis=-1)


def broadcast_to_tokens(advantages: jax.Array, mask: jax.Array) -> jax.Array:
  """Per-response advantages ``[B]`` → per-token ``[B, T]`` (0 at masked tokens)."""
  check_ndim("advantages", advantages, 1, "a [batch] array")
  check_ndim("mask", mask, 2, "a [batch, time] array")
  if mask.shape[0] != advantages.shape[0]:
    raise ValueError(f"advantages has batch size {advantages.shape[0]}, but mask has "
                     f"{mask.shape[0]}; they must match")
  a = upcast(advantages)
  return jnp.where(as_valid(mask), a[:, None], 0)
