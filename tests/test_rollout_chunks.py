"""Chunked rollout generation (``rollout.prompts_per_generate``): ``rollout.generate``'s engine calls.

A step's prompts go to the sampler ``c`` at a time, each chunk with the step's
key and its first row's id as ``row_offset``, at the step's prompt bucket and a
batch bucket of ``c``. Checked here on one device with a tiny random Qwen2: the
rows are those of the per-chunk sampler calls, in order, and equal the rows of
one unchunked call (sampled, so the per-row keys are what makes them equal);
one step compiles the sampler once, a ragged last chunk included; greedy
decoding does not depend on the chunking (an independent check of row order
and group layout). The loop-level runs
(resume, chunk = all) are in tests/test_train_loop.py.
"""
import jax
import numpy as np
import pytest

from jaxent import models, rollout, sampler
from jaxent.config import RolloutConfig
from tests._tiny import TINY_ARCH

# 5 prompts of 1..9 tokens (prompt bucket 16 for any subset); chunks of 2, 2 and 1.
PROMPTS = [[1, 2, 3], [4] * 9, [5, 6], [7], [8, 9, 10, 11, 12]]
EOS = 2
R = 5  # max_new_tokens


@pytest.fixture(scope="module")
def policy():
  m = models.init_model(models.ModelConfig(**TINY_ARCH, vocab_size=15), seed=3)
  return m


def generate_responses(policy, prompts, ro, *, eos_id, key):
  """(tokens, mask) of the rollout layer's generation with the static engine."""
  toks, _, mask = rollout.generate(rollout.SamplerEngine(), policy, prompts, ro, eos_id=eos_id,
                                   key=key)
  return toks, mask


def _ro(**kw) -> RolloutConfig:
  base = dict(prompts_per_step=len(PROMPTS), samples_per_prompt=3, max_new_tokens=R, temperature=1.0)
  cfg = RolloutConfig(**{**base, **kw})
  cfg.validate()
  return cfg


def test_chunks_are_sampler_calls_with_row_offsets_compiled_once(policy):
  ro = _ro(prompts_per_generate=2)
  key = jax.random.PRNGKey(7)
  # R = 5 is used by no other test: the first call compiles, once for its three chunks
  # (2, 2 and a ragged 1, padded to the same batch bucket).
  before = dict(sampler.TRACE_COUNTS)
  toks, mask = generate_responses(policy, PROMPTS, ro, eos_id=EOS, key=key)
  assert sampler.TRACE_COUNTS["prefill"] == before.get("prefill", 0) + 1
  assert sampler.TRACE_COUNTS["decode"] == before.get("decode", 0) + 1
  assert toks.shape == mask.shape == (len(PROMPTS) * 3, R)
  for i, lo in enumerate((0, 2, 4)):
    want = sampler.generate(policy, PROMPTS[lo:lo + 2], max_new_tokens=R, temperature=1.0,
                            eos_id=EOS, num_samples=3, key=key, row_offset=lo * 3,
                            prompt_buckets=(16,), batch_buckets=(2,))
    rows = slice(lo * 3, (lo + len(PROMPTS[lo:lo + 2])) * 3)
    np.testing.assert_array_equal(toks[rows], np.asarray(want.tokens), err_msg=f"chunk {i}")
    np.testing.assert_array_equal(mask[rows], np.asarray(want.mask), err_msg=f"chunk {i}")
  # The mask is 1 up to and including the first EOS.
  for t, m in zip(toks, mask):
    n = int(m.sum())
    assert m[:n].all() and not m[n:].any()
    assert (EOS not in t[:n - 1]) and (n == R or t[n - 1] == EOS)
  # Another step's prompts within the same prompt bucket: nothing new is compiled.
  after = dict(sampler.TRACE_COUNTS)
  generate_responses(policy, [p[::-1] + [3] for p in PROMPTS], ro, eos_id=EOS, key=jax.random.PRNGKey(2))
  assert dict(sampler.TRACE_COUNTS) == after
  # Sampled rows do not depend on the chunking: the unchunked call draws the same
  # tokens (row r draws with fold_in(key, r) either way), and they are really sampled
  # (another key draws other rows).
  whole, wmask = generate_responses(policy, PROMPTS, _ro(), eos_id=EOS, key=key)
  np.testing.assert_array_equal(toks, whole)
  np.testing.assert_array_equal(mask, wmask)
  other, _ = generate_responses(policy, PROMPTS, _ro(), eos_id=EOS, key=jax.random.PRNGKey(8))
  assert not np.array_equal(other, whole)


def test_greedy_rows_do_not_depend_on_chunking(policy):
  """Row i*n + j is sample j of prompt i whatever the chunking (greedy: keys do not matter)."""
  key = jax.random.PRNGKey(0)
  whole, wmask = generate_responses(policy, PROMPTS, _ro(temperature=0.0), eos_id=EOS, key=key)
  toks, mask = generate_responses(policy, PROMPTS, _ro(temperature=0.0, prompts_per_generate=2),
                                  eos_id=EOS, key=key)
  np.testing.assert_array_equal(toks, whole)
  np.testing.assert_array_equal(mask, wmask)
  groups = toks.reshape(len(PROMPTS), 3, R)
  assert (groups == groups[:, :1]).all()                  # a group's greedy samples agree
  assert len({g[0].tobytes() for g in groups}) > 1        # and the prompts' responses do not
