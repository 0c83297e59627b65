"""advantages: GRPO / Dr.GRPO / RLOO outcome advantages against hand and NumPy."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxent import advantages


def np_grpo(scores, ids, valid, eps, scale):
  """REFERENCE.md: per group (s − mean)/(std + ε), unbiased std; a group of one: mean 0, std 1."""
  out = np.zeros(len(scores))
  for g in set(ids[valid].tolist()):
    members = np.flatnonzero((ids == g) & valid)
    s = scores[members].astype(np.float64)
    mean, std = (0.0, 1.0) if len(s) == 1 else (s.mean(), s.std(ddof=1))
    out[members] = (s - mean) / (std + eps) if scale else s - mean
  return out


def np_rloo(scores, ids, valid):
  out = np.zeros(len(scores))
  for i in np.flatnonzero(valid):
    others = np.flatnonzero((ids == ids[i]) & valid & (np.arange(len(scores)) != i))
    out[i] = scores[i] - (scores[others].mean() if len(others) else 0.0)
  return out


@functools.partial(jax.jit, static_argnames=("num_groups",))
def _all(scores, ids, valid, eps, num_groups):
  return (advantages.grpo(scores, ids, num_groups=num_groups, eps=eps, valid=valid),
          advantages.grpo(scores, ids, num_groups=num_groups, scale_by_std=False, valid=valid),
          advantages.rloo(scores, ids, num_groups=num_groups, valid=valid))


def test_grpo_hand_case():
  scores = jnp.asarray([1.0, 2.0, 3.0, 5.0, 5.0, 4.0])
  ids = jnp.asarray([0, 0, 0, 1, 1, 2])
  g, dr, rl = _all(scores, ids, jnp.ones(6, bool), 0.0, num_groups=4)  # group 3 is empty
  # Group 0: mean 2, unbiased std 1. Group 1: all equal -> 0. Group 2: one member.
  np.testing.assert_allclose(g, [-1.0, 0.0, 1.0, 0.0, 0.0, 4.0], atol=1e-6)
  np.testing.assert_allclose(dr, [-1.0, 0.0, 1.0, 0.0, 0.0, 4.0], atol=1e-6)
  # RLOO: s − mean of the others; a lone response keeps its score.
  np.testing.assert_allclose(rl, [-1.5, 0.0, 1.5, 0.0, 0.0, 4.0], atol=1e-6)


def test_grpo_and_rloo_match_numpy_with_invalid_rows():
  rng = np.random.default_rng(0)
  n, groups = 40, 7
  scores = rng.normal(size=n).astype(np.float32) * 3 + 10  # a large shared offset
  ids = rng.integers(0, groups, size=n).astype(np.int32)
  valid = rng.random(n) > 0.2
  g, dr, rl = _all(scores, ids, valid, 1e-6, num_groups=groups)
  np.testing.assert_allclose(g, np_grpo(scores, ids, valid, 1e-6, True), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(dr, np_grpo(scores, ids, valid, 1e-6, False), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(rl, np_rloo(scores, ids, valid), rtol=1e-4, atol=1e-5)
  assert np.all(np.asarray(g)[~valid] == 0)
  # Invalid rows may hold NaN: they take no part.
  bad = np.where(valid, scores, np.nan).astype(np.float32)
  for x, y in zip(_all(bad, ids, valid, 1e-6, num_groups=groups), (g, dr, rl)):
    np.testing.assert_array_equal(x, y)
  assert _all._cache_size() == 2  # one per num_groups; new values never recompile


def test_scores_and_broadcast_to_tokens():
  rewards = jnp.asarray([[0.0, 0.0, 1.0, 9.0], [0.5, 0.5, 9.0, 9.0]])
  mask = jnp.asarray([[1, 1, 1, 0], [1, 1, 0, 0]])
  s = advantages.sequence_scores(rewards, mask)
  np.testing.assert_allclose(s, [1.0, 1.0])
  tok = advantages.broadcast_to_tokens(jnp.asarray([2.0, -1.0]), mask)
  np.testing.assert_allclose(tok, [[2, 2, 2, 0], [-1, -1, 0, 0]])


def test_bad_input():
  s = jnp.zeros(4)
  with pytest.raises(ValueError, match="group_ids"):
    advantages.grpo(s, jnp.zeros(3, jnp.int32), num_groups=2)
  with pytest.raises(ValueError, match="group_ids must be an integer"):
    advantages.grpo(s, jnp.zeros(4), num_groups=2)
  with pytest.raises(ValueError, match="num_groups"):
    advantages.rloo(s, jnp.zeros(4, jnp.int32), num_groups=0)
  with pytest.raises(ValueError, match="eps"):
    advantages.grpo(s, jnp.zeros(4, jnp.int32), num_groups=1, eps=-1.0)
  with pytest.raises(ValueError, match="scores must be"):
    advantages.grpo(jnp.zeros((4, 2)), jnp.zeros(4, jnp.int32), num_groups=1)
  with pytest.raises(ValueError, match="mask has batch size|batch size"):
    advantages.broadcast_to_tokens(s, jnp.zeros((3, 5)))
  assert math.isfinite(float(advantages.grpo(s, jnp.zeros(4, jnp.int32), num_groups=1)[0]))
