"""Layer 5: prompts -> sampler -> rewards -> GRPO advantages -> a fixed-shape Batch.

Rows are ordered as the sampler returns them: the ``n`` responses to prompt
``i`` are rows ``i*n .. i*n+n-1``, so row ``r`` belongs to group ``r // n``.
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxent import advantages as adv_lib
from jaxent.rewards import is_correct
from jaxent.sampler import prompt_bucket
from jaxent.types import Batch


@dataclasses.dataclass(frozen=True)
class RolloutStats:
  reward_mean: float
  reward_std: float
  accuracy: float                 # fraction of responses judged correct (rewards.is_correct)
  response_len_mean: float
  response_len_max: int
  filtered_groups: int            # groups with all-equal rewards masked out (filter_groups)
  truncated_frac: float           # responses that hit max_new_tokens without EOS


def assemble(prompts: Sequence[Sequence[int]], response_tokens: np.ndarray, response_mask: np.ndarray,
             rewards: np.ndarray, *, samples_per_prompt: int, pad_id: int, prompt_len: int | None = None,
             scale_by_std: bool = True, filter_groups: bool = False, eps: float = 1e-6,
             eos_id: int | None = None,
             rollout_log_prob: np.ndarray | None = None) -> tuple[Batch, RolloutStats]:
  """Builds the training :class:`Batch` from sampled responses and their rewards.

  Args:
    prompts: the P prompts as token-id lists (each repeated ``samples_per_prompt`` times).
    response_tokens: int [P*n, R] sampled tokens.
    response_mask: [P*n, R] 1 up to and including EOS.
    rewards: float [P*n] sequence scores.
    prompt_len: padded prompt length; default: the bucket of the longest prompt.
    filter_groups: DAPO-style filtering without changing shapes: rows of groups
      whose rewards are all equal get response mask 0 (their advantage is 0
      anyway), so they drop out of every token count.
    rollout_log_prob: float [P*n, R] the sampler's log-probs of the sampled
      tokens; kept where the response mask is 1 (0 elsewhere) as
      ``Batch.rollout_log_prob``. None: zeros.

  Returns:
    (batch with zero old/ref log-probs to be filled by a forward pass, stats)
  """
  n = samples_per_prompt
  num_prompts = len(prompts)
  rows, r_len = response_tokens.shape
  if rows != num_prompts * n:
    raise ValueError(f"response_tokens has {rows} rows; expected {num_prompts} prompts x {n} samples")
  if rewards.shape != (rows,):
    raise ValueError(f"rewards has shape {rewards.shape}; expected ({rows},)")
  longest = max(len(p) for p in prompts)
  p_len = prompt_bucket(longest) if prompt_len is None else prompt_len
  if longest > p_len:
    raise ValueError(f"a prompt has {longest} tokens; prompt_len is {p_len}")

  s_len = p_len + r_len
  tokens = np.full((rows, s_len), pad_id, np.int32)
  attn = np.zeros((rows, s_len), np.int32)
  pos = np.zeros((rows, s_len), np.int32)
  resp_mask = np.asarray(response_mask, np.float32)
  for i, p in enumerate(prompts):
    off = p_len - len(p)
    sl = slice(i * n, (i + 1) * n)
    tokens[sl, off:p_len] = np.asarray(p, np.int32)
    attn[sl, off:p_len] = 1
    pos[sl, off:] = np.arange(s_len - off)
  tokens[:, p_len:] = np.where(resp_mask > 0, response_tokens, pad_id)
  attn[:, p_len:] = (resp_mask > 0).astype(np.int32)

  rewards = np.asarray(rewards, np.float32)
  group_ids = np.arange(rows) // n
  seq_adv = np.asarray(adv_lib.grpo(jnp.asarray(rewards), jnp.asarray(group_ids), num_groups=num_prompts,
                                    eps=eps, scale_by_std=scale_by_std))
  uniform = uniform_groups(rewards, n)
  filtered = int(uniform.sum()) if filter_groups else 0
  if filter_groups:
    resp_mask = resp_mask * np.repeat(~uniform, n)[:, None].astype(np.float32)
    attn[:, p_len:] = (resp_mask > 0).astype(np.int32)

  advantages = (seq_adv[:, None] * (resp_mask > 0)).astype(np.float32)
  lengths = np.asarray(response_mask, np.float32).sum(axis=1)
  if eos_id is not None:
    has_eos = ((np.asarray(response_tokens) == eos_id) & (np.asarray(response_mask) > 0)).any(axis=1)
  else:
    has_eos = lengths < r_len
  zeros = np.zeros((rows, r_len), np.float32)
  if rollout_log_prob is None:
    rollout_lp = zeros
  else:
    if np.shape(rollout_log_prob) != (rows, r_len):
      raise ValueError(f"rollout_log_prob has shape {np.shape(rollout_log_prob)}; expected "
                       f"{(rows, r_len)}")
    rollout_lp = np.where(resp_mask > 0, rollout_log_prob, 0.0).astype(np.float32)
  batch = Batch(tokens=tokens, positions=pos, attention_mask=attn, response_mask=resp_mask,
                advantages=advantages, old_log_prob=zeros, ref_log_prob=zeros,
                rollout_log_prob=rollout_lp)
  stats = RolloutStats(
      reward_mean=float(rewards.mean()), reward_std=float(rewards.std()),
      accuracy=float(is_correct(rewards).mean()), response_len_mean=float(lengths.mean()),
      response_len_max=int(lengths.max()) if rows else 0, filtered_groups=filtered,
      truncated_frac=float((~has_eos).mean()))
  return batch, stats


def uniform_groups(rewards: np.ndarray, samples_per_prompt: int) -> np.ndarray:
  """bool ``[groups]``: the groups whose ``samples_per_prompt`` rewards are all equal."""
  grouped = np.asarray(rewards).reshape(-1, samples_per_prompt)
  return np.all(grouped == grouped[:, :1], axis=1)


class Selected(NamedTuple):
  """The groups ``select_groups`` keeps, rows in generation order."""
  prompts: list
  response_tokens: np.ndarray
  response_mask: np.ndarray
  rewards: np.ndarray
  kept: int              # chosen groups whose rewards are not all equal


def selected_rows(rewards: np.ndarray, *, num_groups: int, samples_per_prompt: int
                  ) -> tuple[np.ndarray, np.ndarray, int]:
  """``(groups, rows, kept)`` that ``select_groups`` keeps (indices into its inputs)."""
  n = samples_per_prompt
  uniform = uniform_groups(rewards, n)
  order = np.sort(np.concatenate([np.flatnonzero(~uniform), np.flatnonzero(uniform)])[:num_groups])
  rows = (order[:, None] * n + np.arange(n)[None, :]).reshape(-1)
  return order, rows, int(np.sum(~uniform[order]))


def select_groups(prompts: Sequence[Sequence[int]], response_tokens: np.ndarray,
                  response_mask: np.ndarray, rewards: np.ndarray, *, num_groups: int,
                  samples_per_prompt: int) -> Selected:
  """DAPO dynamic sampling: ``num_groups`` groups, those with unequal rewards first.

  The inputs are one or more generation batches concatenated in order (group
  ``g`` = prompt ``g`` and rows ``g*n .. g*n+n-1``). The result holds the
  first ``num_groups`` groups whose rewards are not all equal; when there are
  fewer, the first all-equal groups fill the rest, so the batch keeps its
  static shape and ``assemble(..., filter_groups=True)`` masks them out. The
  chosen groups keep their generation order, so a single batch
  (``num_groups`` = all of it) comes back unchanged and its masked groups
  stay spread over the mini-batches as without refills.

  Returns:
    the chosen groups' ``Selected(prompts, response_tokens, response_mask,
    rewards, kept)``, ``kept`` the number of them with unequal rewards.
  """
  n = samples_per_prompt
  groups = len(prompts)
  if np.shape(rewards) != (groups * n,) or len(response_tokens) != groups * n:
    raise ValueError(f"select_groups: {groups} prompts x {n} samples, but {len(response_tokens)} "
                     f"responses and rewards of shape {np.shape(rewards)}")
  if groups < num_groups:
    raise ValueError(f"select_groups: {groups} groups generated, fewer than num_groups={num_groups}")
  order, rows, kept = selected_rows(rewards, num_groups=num_groups, samples_per_prompt=n)
  return Selected([prompts[g] for g in order], np.asarray(response_tokens)[rows],
                  np.asarray(response_mask)[rows], np.asarray(rewards)[rows], kept)


def to_device(batch: Batch, sharding: Any = None) -> Batch:
  """Host arrays -> device arrays (optionally batch-sharded)."""
  if sharding is None:
    return jax.tree.map(jnp.asarray, batch)
  return jax.device_put(batch, sharding)
