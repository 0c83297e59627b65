"""Rollout assembly: layout of the Batch, GRPO advantages, group filtering."""
import numpy as np
import pytest

from jaxent import rollout

PAD, EOS = 0, 9


def _case():
  prompts = [[5, 6, 7], [3]]                       # ragged prompts
  n = 3
  toks = np.array([[1, 2, EOS, 4], [1, EOS, 0, 0], [2, 2, 2, 2],
                   [4, EOS, 0, 0], [4, 4, EOS, 0], [4, 3, EOS, 0]], np.int32)
  mask = np.array([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1],
                   [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 0]], np.float32)
  rewards = np.array([1.0, 0.0, 0.0, 1.0, 1.0, 1.0], np.float32)
  return prompts, n, toks, mask, rewards


def test_layout_positions_and_masks():
  prompts, n, toks, mask, rewards = _case()
  b, stats = rollout.assemble(prompts, toks, mask, rewards, samples_per_prompt=n, pad_id=PAD, eos_id=EOS)
  assert b.tokens.shape == (6, 4 + 4) and b.prompt_len == 4       # prompt bucket 4
  # row 0: prompt [5,6,7] left-padded to 4, then the response up to EOS, pad after
  np.testing.assert_array_equal(b.tokens[0], [0, 5, 6, 7, 1, 2, EOS, PAD])
  np.testing.assert_array_equal(b.attention_mask[0], [0] + [1] * 6 + [0])
  np.testing.assert_array_equal(b.positions[0, 1:], np.arange(7))  # 0 at the first real token
  np.testing.assert_array_equal(b.tokens[3, :4], [0] * 3 + [3])
  np.testing.assert_array_equal(b.positions[3, 3:], np.arange(5))
  np.testing.assert_array_equal(b.response_mask, mask)
  assert stats.truncated_frac == pytest.approx(1 / 6)            # row 2 never emitted EOS
  assert stats.accuracy == pytest.approx(4 / 6)


def test_grpo_advantages_float64_reference():
  prompts, n, toks, mask, rewards = _case()
  b, _ = rollout.assemble(prompts, toks, mask, rewards, samples_per_prompt=n, pad_id=PAD)
  g = rewards.astype(np.float64).reshape(2, n)
  ref = (g - g.mean(1, keepdims=True)) / (g.std(1, ddof=1, keepdims=True) + 1e-6)
  ref = ref.reshape(-1)[:, None] * mask
  np.testing.assert_allclose(b.advantages, ref, rtol=1e-5, atol=1e-6)
  # group 2 has all-equal rewards: zero advantage
  assert np.all(b.advantages[3:] == 0)


def test_filter_groups_masks_uniform_groups_only():
  prompts, n, toks, mask, rewards = _case()
  b, stats = rollout.assemble(prompts, toks, mask, rewards, samples_per_prompt=n, pad_id=PAD,
                              filter_groups=True)
  assert stats.filtered_groups == 1
  assert b.response_mask[3:].sum() == 0 and b.attention_mask[3:, 4:].sum() == 0
  np.testing.assert_array_equal(b.response_mask[:3], mask[:3])


def test_select_groups_keeps_unequal_groups_in_order_and_fills_with_equal_ones():
  # Two generation batches of 3 groups x 2 samples; group g's rows are 2g, 2g+1.
  prompts = [[10], [11], [12], [13], [14], [15]]
  rewards = np.array([1, 1, 0, 1, 0, 0, 1, 0, 1, 1, 0, 1], np.float32)  # unequal: 1, 3, 5
  toks = np.arange(12 * 2).reshape(12, 2)
  mask = np.ones((12, 2), np.int32)
  p, t, m, r, kept = rollout.select_groups(prompts, toks, mask, rewards, num_groups=3,
                                           samples_per_prompt=2)
  assert kept == 3 and p == [[11], [13], [15]]
  np.testing.assert_array_equal(t, toks[[2, 3, 6, 7, 10, 11]])
  np.testing.assert_array_equal(r, [0, 1, 1, 0, 0, 1])
  # Four wanted, three unequal: the first equal group (0) fills the gap, in generation order,
  # and assemble masks it.
  p, t, m, r, kept = rollout.select_groups(prompts, toks, mask, rewards, num_groups=4,
                                           samples_per_prompt=2)
  assert kept == 3 and p == [[10], [11], [13], [15]]
  b, stats = rollout.assemble(p, t, m, r, samples_per_prompt=2, pad_id=PAD, filter_groups=True)
  assert stats.filtered_groups == 1 and b.response_mask[:2].sum() == 0 and b.response_mask[2:].all()
  # All groups wanted (one generation batch, no refill): the batch comes back unchanged.
  p, t, m, r, kept = rollout.select_groups(prompts, toks, mask, rewards, num_groups=6,
                                           samples_per_prompt=2)
  assert kept == 3 and p == prompts
  np.testing.assert_array_equal(t, toks)
  np.testing.assert_array_equal(r, rewards)
  with pytest.raises(ValueError, match="fewer than num_groups=7"):
    rollout.select_groups(prompts, toks, mask, rewards, num_groups=7, samples_per_prompt=2)
  with pytest.raises(ValueError, match="6 prompts x 2 samples"):
    rollout.select_groups(prompts, toks[:10], mask, rewards, num_groups=3, samples_per_prompt=2)


def test_bad_shapes_are_named():
  prompts, n, toks, mask, rewards = _case()
  with pytest.raises(ValueError, match="expected 2 prompts x 2 samples"):
    rollout.assemble(prompts, toks, mask, rewards, samples_per_prompt=2, pad_id=PAD)
  with pytest.raises(ValueError, match="rewards has shape"):
    rollout.assemble(prompts, toks, mask, rewards[:3], samples_per_prompt=n, pad_id=PAD)
  assert [rollout.bucket_length(n) for n in (1, 4, 9, 64, 65, 200)] == [4, 4, 12, 64, 128, 256]
  with pytest.raises(ValueError, match="prompt_len is 2"):
    rollout.assemble(prompts, toks, mask, rewards, samples_per_prompt=n, pad_id=PAD, prompt_len=2)
