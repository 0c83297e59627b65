"""jaxent.sampler engines: per-row keys, budgets, continuous batching, stats.

References: the static engine in one call (the continuous engine and every
chunking must reproduce its rows exactly: the draws use per-row keys, and
the model's logits are well separated, so the last-bit differences of a
different batch cannot flip a token); a teacher-forced float64 forward for
the continuous engine's log-probs; hand-counted lengths for budgets; the
trace counter for recompiles.
"""
from __future__ import annotations

import jax
import numpy as np
import pytest
from scipy import special

from jaxent import models, sampler
from jaxent.sampler import _continuous

V, R = 64, 12
# Ragged prompts (P = 12); 5 prompts x 3 samples = 15 rows.
PROMPTS = [[3, 17, 42], [5, 9, 11, 60, 2, 7], [40, 1, 33, 4, 4, 58, 12, 30, 29, 15, 6, 44],
           [8], [21, 22, 23, 24]]
BUDGETS = [12, 3, 9, 1, 6]
EOS = [7, 19]


@pytest.fixture(scope="module")
def model():
  """A 2-layer Qwen2 with weights ~ N(0, 0.2^2): logits well separated (no float near-ties)."""
  cfg = models.ModelConfig(model_type="qwen2", vocab_size=V, hidden_size=32, num_layers=2,
                           num_heads=4, num_kv_heads=2, head_dim=8, intermediate_size=64,
                           initializer_range=0.2)
  return models.init_model(cfg, seed=0)


def _gen(model, prompts=PROMPTS, **kw):
  args = dict(max_new_tokens=R, key=jax.random.key(7), temperature=1.0, top_k=20, eos_id=EOS,
              num_samples=3, budgets=BUDGETS, return_policy_logprobs=True)
  args.update(kw)
  return jax.device_get(sampler.generate(model, prompts, **args))


def _assert_same_rows(got, ref, rows=slice(None)):
  np.testing.assert_array_equal(got.tokens, ref.tokens[rows])
  np.testing.assert_array_equal(got.mask, ref.mask[rows])
  np.testing.assert_array_equal(got.lengths, ref.lengths[rows])
  np.testing.assert_allclose(got.logprobs, ref.logprobs[rows], atol=2e-5)
  np.testing.assert_allclose(got.policy_logprobs, ref.policy_logprobs[rows], atol=2e-5)


# ----------------------------------------------------------------------------- invariance
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_rows_identical_across_engines_slots_steps_and_chunks(model, temperature):
  ref = _gen(model, temperature=temperature)
  assert (ref.lengths < R).any() and len(set(ref.lengths.tolist())) > 3  # ragged rows
  # Continuous batching: fewer slots than rows (a queue) with K = 3, then one
  # slot (a prompt's samples prefilled one at a time) with K = 1, and K = R.
  for slots, k in [(4, 3), (1, 1), (4, None)]:
    got = _gen(model, temperature=temperature, engine="continuous", slots=slots,
               steps_per_call=k)
    _assert_same_rows(got, ref)
  # Chunks of 2, 2 and 1 prompts (padded to the batch bucket of the one call, so the
  # same programs run): each chunk's rows carry their global ids (row_offset).
  for lo in range(0, len(PROMPTS), 2):
    hi = min(lo + 2, len(PROMPTS))
    got = _gen(model, PROMPTS[lo:hi], budgets=BUDGETS[lo:hi], row_offset=lo * 3,
               temperature=temperature, batch_buckets=(8,))
    _assert_same_rows(got, ref, slice(lo * 3, hi * 3))


def test_row_offset_selects_the_rows_draws(model):
  """A chunk drawn with another row offset is other rows: its tokens change."""
  ref = _gen(model)
  shifted = _gen(model, PROMPTS[:2], budgets=BUDGETS[:2], row_offset=1, batch_buckets=(8,))
  assert not np.array_equal(shifted.tokens, ref.tokens[:6])
  # Row 1 of the shifted chunk is sample 2 of prompt 0 under row id 2: the same draws.
  np.testing.assert_array_equal(shifted.tokens[1], ref.tokens[2])


def test_continuous_logprobs_equal_teacher_forced_forward(model):
  temp, top_k = 0.8, 20
  out = _gen(model, temperature=temp, top_k=top_k, engine="continuous", slots=4,
             steps_per_call=3)
  n = 3
  # One un-cached forward over every row's prompt + response, right-padded
  # (causal attention hides the padding from earlier positions).
  seqs = np.zeros((len(PROMPTS) * n, 12 + R), np.int32)
  for row in range(len(seqs)):
    x = PROMPTS[row // n] + out.tokens[row, :out.lengths[row]].tolist()
    seqs[row, :len(x)] = x
  logits = np.asarray(models.apply(model.config, model.params, seqs)[0], np.float64)
  for row in range(len(seqs)):
    prompt, m = PROMPTS[row // n], int(out.lengths[row])
    z = logits[row, len(prompt) - 1:len(prompt) - 1 + m] / temp
    resp = out.tokens[row, :m]
    policy = (z - special.logsumexp(z, axis=-1, keepdims=True))[np.arange(m), resp]
    # top-k: the kept set is the 20 largest logits; log pi_trunc renormalizes over it.
    kth = np.sort(z, axis=-1)[:, -top_k][:, None]
    zt = np.where(z >= kth, z, -np.inf)
    trunc = (zt - special.logsumexp(zt, axis=-1, keepdims=True))[np.arange(m), resp]
    np.testing.assert_allclose(out.policy_logprobs[row, :m], policy, atol=2e-4)
    np.testing.assert_allclose(out.logprobs[row, :m], trunc, atol=2e-4)
    assert (out.logprobs[row, m:] == 0).all() and (out.tokens[row, m:] == 0).all()


# ----------------------------------------------------------------------------- budgets
@pytest.mark.parametrize("engine", ["static", "continuous"])
def test_budgets_cap_each_row_and_keep_its_prefix(model, engine):
  full = _gen(model, eos_id=None, budgets=None, engine=engine, slots=4)
  np.testing.assert_array_equal(full.lengths, R)
  got = _gen(model, eos_id=None, engine=engine, slots=4)
  want = np.repeat(BUDGETS, 3)
  np.testing.assert_array_equal(got.lengths, want)
  for row, b in enumerate(want):
    np.testing.assert_array_equal(got.mask[row], np.arange(R) < b)
    # Per-row keys: a budget only cuts the row; its first b tokens are the uncut row's.
    np.testing.assert_array_equal(got.tokens[row, :b], full.tokens[row, :b])
    assert (got.tokens[row, b:] == 0).all()
  # One budget per row (B * n of them).
  per_row = np.arange(15) % R + 1
  got = _gen(model, eos_id=None, budgets=per_row.tolist(), engine=engine, slots=4)
  np.testing.assert_array_equal(got.lengths, per_row)
  # With EOS: the row ends at the first EOS or at its budget, whichever comes first.
  eos_run = _gen(model, engine=engine, slots=4)
  for row, b in enumerate(want):
    hit = np.flatnonzero(np.isin(full.tokens[row], EOS))
    expect = min(b, int(hit[0]) + 1) if hit.size else b
    assert eos_run.lengths[row] == expect


# ----------------------------------------------------------------------------- stats
def test_stats_count_the_work_done(model):
  per_row = [12, 1, 1, 1, 2, 2, 1, 1, 3, 1, 1, 2, 1, 1, 1]  # long-tailed
  st = _gen(model, eos_id=None, budgets=per_row)
  # Static: 15 rows padded to 8 prompts x 3 = 24 rows, one draw step per token of the longest row.
  assert int(st.stats.decode_steps) == 12
  assert int(st.stats.slot_steps) == 24 * 12
  assert int(st.stats.generated_tokens) == sum(per_row)
  ct = _gen(model, eos_id=None, budgets=per_row, engine="continuous", slots=4)
  assert int(ct.stats.generated_tokens) == sum(per_row)
  # Every kept token is one computed row draw; a long-tailed batch keeps the slots busier.
  assert sum(per_row) <= int(ct.stats.slot_steps) < int(st.stats.slot_steps)
  util = lambda s: int(s.generated_tokens) / int(s.slot_steps)  # noqa: E731
  assert util(ct.stats) > 2 * util(st.stats)


# ----------------------------------------------------------------------------- slots
def test_slot_reuse_never_reads_a_previous_rows_cache(model, monkeypatch):
  """NaN planted in every cache entry of every slot does not change any row."""
  ref = _gen(model, engine="continuous", slots=4, steps_per_call=3)
  init = _continuous._init

  def poisoned(spec, pad_id):
    st = init(spec, pad_id)
    nan = lambda x: x.at[...].set(np.nan)  # noqa: E731
    return st._replace(cache=st.cache._replace(k=nan(st.cache.k), v=nan(st.cache.v)))

  monkeypatch.setattr(_continuous, "_init", poisoned)
  got = _gen(model, engine="continuous", slots=4, steps_per_call=3)
  _assert_same_rows(got, ref)
  assert np.isfinite(got.logprobs).all()


def test_no_recompile_as_the_queue_drains(model):
  kw = dict(engine="continuous", slots=4, steps_per_call=2)
  _gen(model, **kw)  # compiles init, insert, decode
  before = dict(sampler.TRACE_COUNTS)
  # New prompts (same prompt bucket and row count), budgets, knobs, K: many
  # inserts and decode calls, no new trace.
  prompts = [[1] * 12, [2], [3, 4, 5], [9] * 7, [10, 11]]
  for t, k, b, steps in [(0.0, 0, [1, 12, 5, 5, 2], 1), (1.3, 5, [3, 3, 3, 12, 1], 4)]:
    out = _gen(model, prompts, temperature=t, top_k=k, budgets=b, engine="continuous",
               slots=4, steps_per_call=steps, eos_id=[7])
    assert out.tokens.shape == (15, R)
  assert dict(sampler.TRACE_COUNTS) == before
  assert before["continuous_insert"] >= 1 and before["continuous_decode"] >= 1


# ----------------------------------------------------------------------------- bfloat16
@pytest.mark.parametrize("engine", ["static", "continuous"])
def test_bfloat16_generation_draws_the_float32_rows(model, engine):
  """bfloat16 copies of the weights (cache in bfloat16) give the float32 greedy tokens on a
  well-separated model; the policy log-probs differ by bfloat16 rounding only.

  (Sampled tokens are not compared: an inverse-CDF draw flips when a bfloat16
  error of ~1e-2 in a log-prob moves a category boundary past the uniform.)
  """
  ref = _gen(model, temperature=0.0)
  got = _gen(model, temperature=0.0, engine=engine, slots=4, compute_dtype="bfloat16")
  np.testing.assert_array_equal(got.tokens, ref.tokens)
  np.testing.assert_array_equal(got.lengths, ref.lengths)
  assert got.policy_logprobs.dtype == np.float32
  diff = np.abs(got.policy_logprobs - ref.policy_logprobs)
  assert 0 < diff.max() < 0.1  # really computed in bfloat16, and close
  # The caller's float32 master weights are untouched.
  assert all(x.dtype == np.float32 for x in jax.tree.leaves(model.params))


def test_bfloat16_copy_casts_weights_and_cache():
  from jaxent.sampler import _sampler
  cfg = models.ModelConfig(model_type="qwen2", vocab_size=V, hidden_size=32, num_layers=2,
                           num_heads=4, num_kv_heads=2, head_dim=8, intermediate_size=64)
  m = models.init_model(cfg, seed=1)
  copy = _sampler.generation_copy(m, "bfloat16")
  assert copy.config.dtype == np.dtype("bfloat16") and copy.config.param_dtype == np.dtype("bfloat16")
  for a, b in zip(jax.tree.leaves(m.params), jax.tree.leaves(copy.params)):
    assert b.dtype == jax.numpy.bfloat16
    np.testing.assert_array_equal(np.asarray(b, np.float32),
                                  np.asarray(jax.numpy.asarray(a).astype("bfloat16"), np.float32))
  assert models.init_cache(copy.config, 1, 4).k.dtype == jax.numpy.bfloat16
  with pytest.raises(ValueError, match="compute_dtype"):
    _sampler.generation_copy(m, "int32")


# ----------------------------------------------------------------------------- mesh
def test_continuous_on_a_mesh_gives_the_single_device_rows(model):
  """8 CPU devices (slots over data = 4, kv heads over tensor = 2) == the static engine on one."""
  from jaxent.sharding import make_mesh
  mesh = make_mesh(data=4, fsdp=1, tensor=2)
  ref = _gen(model)
  got = sampler.generate(model, PROMPTS, max_new_tokens=R, key=jax.random.key(7), temperature=1.0,
                         top_k=20, eos_id=EOS, num_samples=3, budgets=BUDGETS,
                         return_policy_logprobs=True, engine="continuous", slots=4,
                         steps_per_call=3, mesh=mesh)
  assert got.tokens.sharding.mesh.shape == mesh.shape
  _assert_same_rows(jax.device_get(got), ref)


# ----------------------------------------------------------------------------- validation
@pytest.mark.parametrize("kwargs,name", [
    (dict(engine="vllm"), "engine"),
    (dict(engine="continuous", slots=0), "slots"),
    (dict(engine="static", slots=-2), "slots"),
    (dict(engine="continuous", steps_per_call=0), "steps_per_call"),
    (dict(budgets=[13, 1, 1, 1, 1]), "budgets\\[0\\] = 13 .*max_new_tokens = 12"),
    (dict(budgets=[1, 0, 1, 1, 1], engine="continuous"), "budgets\\[1\\] = 0"),
    (dict(budgets=[1, 2]), "budgets"),
    (dict(row_offset=-1), "row_offset"),
    (dict(engine="continuous", prompt_buckets=(4,)), "prompts"),
])
def test_bad_input_names_the_argument(model, kwargs, name):
  with pytest.raises(ValueError, match=name):
    _gen(model, **kwargs)


# ----------------------------------------------------------------------------- rollout
def test_rollout_engine_from_config_and_rollout_log_prob(model):
  from jaxent import rollout
  from jaxent.config import RolloutConfig
  from jaxent.errors import ConfigError

  ro = RolloutConfig(prompts_per_step=5, samples_per_prompt=3, max_new_tokens=R, top_k=20,
                     engine="continuous", slots=4, decode_steps_per_call=3, reward="exact")
  ro.validate()
  engine = rollout.make_engine(ro.engine, slots=ro.slots, steps_per_call=ro.decode_steps_per_call)
  assert engine == rollout.SamplerEngine("continuous", 4, 3)
  key = jax.random.key(7)
  toks, lps, mask = rollout.generate(engine, model, PROMPTS, ro, eos_id=EOS, key=key)
  ref = _gen(model, budgets=None, key=key)
  np.testing.assert_array_equal(toks, ref.tokens)
  np.testing.assert_array_equal(mask, ref.mask)
  np.testing.assert_allclose(lps, ref.logprobs, atol=2e-5)
  # The batch carries the sampler's log-probs where the response mask is 1, 0 elsewhere.
  batch, _ = rollout.assemble(PROMPTS, toks, mask, np.arange(15, dtype=np.float32),
                              samples_per_prompt=3, pad_id=0, rollout_log_prob=lps + 1.0)
  np.testing.assert_allclose(batch.rollout_log_prob, np.where(mask > 0, lps + 1.0, 0.0))
  # bfloat16 generation through the rollout layer: the sampler's bfloat16 rows (greedy).
  bf16 = rollout.make_engine("static", compute_dtype="bfloat16")
  greedy = RolloutConfig(prompts_per_step=5, samples_per_prompt=3, max_new_tokens=R, top_k=20,
                         temperature=0.0, reward="exact")
  toks, _, _ = rollout.generate(bf16, model, PROMPTS, greedy, eos_id=EOS, key=key)
  np.testing.assert_array_equal(toks, _gen(model, budgets=None, temperature=0.0,
                                            compute_dtype="bfloat16").tokens)
  assert rollout.make_engine("continuous", compute_dtype="bfloat16").compute_dtype == "bfloat16"
  RolloutConfig(compute_dtype="bfloat16").validate()
  for bad in (dict(engine="sglang"), dict(slots=-1), dict(decode_steps_per_call=-3),
              dict(compute_dtype="float16")):
    with pytest.raises(ConfigError, match=f"rollout.{next(iter(bad))}"):
      RolloutConfig(**bad).validate()
