"""Metrics of ``k`` graded samples per prompt.

For ``N`` prompts with ``k`` samples each and rewards ``r_ij`` (``i`` the
prompt, ``j`` the sample)::

  mean@k = (1 / N k) sum_ij r_ij
  pass@k = (1 / N) sum_i [1 - C(n - c_i, k) / C(n, k)]   (Chen et al. 2021)

with ``c_i`` the number of samples of prompt ``i`` that are correct
(``rewards.is_correct``: reward >= 0.5). With one greedy sample, mean@1 is
the mean reward and ``accuracy`` the fraction correct.
"""
from __future__ import annotations

import numpy as np

from jaxent.rewards import is_correct


def mean_at_k(rewards: np.ndarray) -> float:
  """mean@k: the mean reward over ``rewards [prompts, k]``."""
  return float(np.asarray(rewards).mean())


def accuracy(rewards: np.ndarray) -> float:
  """The fraction of samples judged correct (``rewards.is_correct``)."""
  return float(is_correct(rewards).mean())


def pass_at_k(correct: np.ndarray, k: int) -> float:
  """Unbiased pass@k (Chen et al., 2021) from ``correct`` [prompts, n] with n >= k."""
  correct = np.asarray(correct, bool)
  n = correct.shape[1]
  if not 1 <= k <= n:
    raise ValueError(f"k={k} must be in [1, {n}] (samples per prompt)")
  c = correct.sum(axis=1)
  # 1 - C(n-c, k) / C(n, k), computed as a product for stability
  out = np.ones(len(c))
  for i, ci in enumerate(c):
    if n - ci < k:
      continue
    out[i] = 1.0 - np.prod(1.0 - k / np.arange(n - ci + 1, n + 1))
  return float(out.mean())
