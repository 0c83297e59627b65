"""jaxent.sampler: parity with transformers, log-probs, sampling statistics, buckets.

References: transformers' greedy ``generate`` (per prompt, unpadded) on tiny
random checkpoints of each family; a teacher-forced ``models.apply`` over
prompt + response with the HF logits warpers; chi-square tests of drawn
frequencies against the model's (truncated) softmax; hand-built logits for
the top-k / top-p kept sets.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from scipy import special, stats
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

from jaxent import models, sampler
from jaxent.sharding import make_mesh

V = 96
_BASE = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
             rms_norm_eps=1e-6, bos_token_id=None, eos_token_id=None, pad_token_id=None)
_FAMILIES = {
    "qwen2": lambda: transformers.Qwen2Config(**_BASE, tie_word_embeddings=False,
                                              rope_parameters={"rope_type": "default",
                                                               "rope_theta": 1e6}),
    # SmolLM2-style: llama, tied embeddings
    "llama": lambda: transformers.LlamaConfig(**_BASE, tie_word_embeddings=True,
                                              rope_parameters={"rope_type": "default",
                                                               "rope_theta": 1e5}),
    "qwen3": lambda: transformers.Qwen3Config(**_BASE, head_dim=24, tie_word_embeddings=False,
                                              rope_parameters={"rope_type": "default",
                                                               "rope_theta": 1e6}),
}
# Ragged prompts: 3 rows -> batch bucket 4 (one padding row), prompt bucket 16.
PROMPTS = [[3, 17, 42], [5, 9, 11, 60, 2, 7, 81], [90, 1, 33, 4, 4, 58, 12, 70, 29, 15, 6, 44]]


def _torch_model(family: str, seed: int = 0):
  """Tiny random HF model; every weight ~ N(0, 0.15^2) so logits are well separated."""
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(_FAMILIES[family](),
                                                        dtype=torch.float32)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):
        p.copy_(1.0 + 0.15 * torch.randn_like(p))
      else:
        p.normal_(0.0, 0.15)
  return model.eval()


@pytest.fixture(scope="module")
def family_models(tmp_path_factory):
  """{family: (torch model, jaxent Model loaded from its save_pretrained dir)}."""
  out = {}
  for fam in _FAMILIES:
    tm = _torch_model(fam)
    d = tmp_path_factory.mktemp(fam)
    tm.save_pretrained(d)
    out[fam] = (tm, models.from_pretrained(d))
  return out


@pytest.fixture(scope="module")
def qwen2(family_models):
  return family_models["qwen2"][1]


def _hf_greedy(tm, prompt, max_new_tokens, eos_id):
  with torch.no_grad():
    seq = tm.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt),
                                                                        dtype=torch.long),
                      max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos_id,
                      pad_token_id=0)
  return seq[0, len(prompt):].tolist()


_REF_ROWS, _REF_WIDTH = 16, 32  # reference forwards share one compiled shape


@jax.jit
def _ref_forward(model, tokens):
  return models.apply(model.config, model.params, tokens)[0]


def _ref_logits(model, seqs):
  """Un-cached float64 logits [len(seqs), width, V] of right-padded sequences.

  Causal attention makes the right padding invisible to earlier positions.
  """
  assert len(seqs) <= _REF_ROWS and max(map(len, seqs)) <= _REF_WIDTH
  batch = np.zeros((_REF_ROWS, _REF_WIDTH), np.int32)
  for row, s in enumerate(seqs):
    batch[row, :len(s)] = s
  return np.asarray(_ref_forward(model, jnp.asarray(batch)), np.float64)[:len(seqs)]


def _first_eos_length(tokens, eos_ids, r):
  """Expected response length: up to and including the first EOS, else R."""
  hit = np.flatnonzero(np.isin(tokens, eos_ids))
  return int(hit[0]) + 1 if hit.size else r


# ----------------------------------------------------------------------------- parity
@pytest.mark.parametrize("family", list(_FAMILIES))
def test_greedy_matches_transformers_generate(family_models, family):
  tm, model = family_models[family]
  r = 8
  key = jax.random.key(0)
  out = sampler.generate(model, PROMPTS, max_new_tokens=r, temperature=0.0, key=key)
  hf = [_hf_greedy(tm, p, r, None) for p in PROMPTS]
  np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(hf))
  np.testing.assert_array_equal(np.asarray(out.lengths), [r] * 3)
  np.testing.assert_array_equal(np.asarray(out.logprobs), 0.0)  # a point mass

  # EOS: the token prompt 0 emits at step 3 ends that row there. Greedy decoding
  # is deterministic, so HF's output with this EOS is its output above cut at
  # the first EOS (HF stops there).
  eos = hf[0][3]
  out = sampler.generate(model, PROMPTS, max_new_tokens=r, temperature=0.0, key=key,
                         eos_id=eos, pad_id=1)
  tokens, mask, lengths = map(np.asarray, (out.tokens, out.mask, out.lengths))
  for i in range(len(PROMPTS)):
    n = _first_eos_length(hf[i], [eos], r)
    assert lengths[i] == n
    assert tokens[i, :n].tolist() == hf[i][:n]
    assert (tokens[i, n:] == 1).all()
    np.testing.assert_array_equal(mask[i], np.arange(r) < n)
  assert lengths[0] <= 4  # the EOS row did stop early


# ----------------------------------------------------------------------------- log-probs
def _warp_reference(z, top_k, top_p):
  """HF warpers on scaled logits z [T, V] (torch, float32) -> log-probs float64."""
  zt = torch.as_tensor(z, dtype=torch.float32)
  zt = TopKLogitsWarper(top_k)(None, zt)
  zt = TopPLogitsWarper(top_p)(None, zt)
  return torch.log_softmax(zt.double(), dim=-1).numpy()


def test_logprobs_equal_teacher_forced_forward(qwen2):
  r, n, temp, top_k, top_p = 10, 3, 0.8, 20, 0.9
  eos = [7, 19, 23, 31, 47, 52, 66, 88]
  out = sampler.generate(qwen2, PROMPTS, max_new_tokens=r, temperature=temp, top_k=top_k,
                         top_p=top_p, eos_id=eos, num_samples=n, key=jax.random.key(3),
                         return_policy_logprobs=True)
  tokens, lp, plp, mask, lengths = map(np.asarray, (out.tokens, out.logprobs,
                                                    out.policy_logprobs, out.mask, out.lengths))
  assert tokens.shape == (3 * n, r) and tokens.dtype == np.int32
  assert (lengths < r).any() and (lengths == r).any()  # both endings are exercised

  # Teacher forcing: one un-cached forward over prompt + response.
  seqs = [PROMPTS[row // n] + tokens[row, :lengths[row]].tolist() for row in range(3 * n)]
  logits = _ref_logits(qwen2, seqs)
  for row in range(3 * n):
    p_len, m = len(PROMPTS[row // n]), lengths[row]
    assert m == _first_eos_length(tokens[row], eos, r)
    np.testing.assert_array_equal(mask[row], np.arange(r) < m)
    assert (tokens[row, m:] == 0).all() and (lp[row, m:] == 0).all() and (plp[row, m:] == 0).all()
    z = logits[row, p_len - 1:p_len - 1 + m] / temp  # [m, V], predicts response tokens
    resp = tokens[row, :m]
    ref_trunc = _warp_reference(z, top_k, top_p)[np.arange(m), resp]
    ref_policy = (z - special.logsumexp(z, axis=-1, keepdims=True))[np.arange(m), resp]
    np.testing.assert_allclose(lp[row, :m], ref_trunc, atol=2e-4, rtol=1e-4)
    np.testing.assert_allclose(plp[row, :m], ref_policy, atol=2e-4, rtol=1e-4)
    assert (lp[row, :m] >= plp[row, :m] - 1e-5).all()  # truncation only moves mass up


# ----------------------------------------------------------------------------- statistics
def _chi2_pvalue(counts, probs, min_expected=5.0):
  """Pearson chi-square; bins with expected count < min_expected are pooled."""
  counts, probs = np.asarray(counts, np.float64), np.asarray(probs, np.float64)
  exp = probs * counts.sum()
  big = exp >= min_expected
  f_obs = np.append(counts[big], counts[~big].sum())
  f_exp = np.append(exp[big], exp[~big].sum())
  if f_exp[-1] == 0:
    f_obs, f_exp = f_obs[:-1], f_exp[:-1]
  return stats.chisquare(f_obs, f_exp * f_obs.sum() / f_exp.sum()).pvalue


def _softmax64(z):
  z = np.asarray(z, np.float64)
  e = np.exp(z - z.max())
  return e / e.sum()


@pytest.mark.parametrize("temp,top_k,top_p", [(0.5, 0, 1.0), (1.0, 0, 1.0), (2.0, 0, 1.0),
                                              (1.0, 8, 0.9)])
def test_sampling_frequencies_match_softmax(qwen2, temp, top_k, top_p):
  n = 4096
  prompt = [5, 17, 33, 2]
  out = sampler.generate(qwen2, [prompt], max_new_tokens=2, temperature=temp, top_k=top_k,
                         top_p=top_p, num_samples=n, key=jax.random.key(11))
  tokens = np.asarray(out.tokens)

  def expected(ctx):
    z = _ref_logits(qwen2, [ctx])[0, len(ctx) - 1] / temp
    if top_k or top_p < 1:
      return np.exp(_warp_reference(z[None], top_k or V, top_p)[0])
    return _softmax64(z)

  # First token: drawn right after the prefill.
  p0 = expected(prompt)
  c0 = np.bincount(tokens[:, 0], minlength=V)
  assert c0[p0 == 0].sum() == 0  # never outside the kept set
  assert _chi2_pvalue(c0[p0 > 0], p0[p0 > 0]) > 1e-3
  # Second token, conditional on the most frequent first token: the decode loop.
  a = int(np.argmax(c0))
  p1 = expected(prompt + [a])
  c1 = np.bincount(tokens[tokens[:, 0] == a, 1], minlength=V)
  assert c1[p1 == 0].sum() == 0
  assert _chi2_pvalue(c1[p1 > 0], p1[p1 > 0]) > 1e-3


# ----------------------------------------------------------------------------- kept sets
def _kept(logits, top_k=0, top_p=1.0):
  z = sampler.truncate_logits(jnp.asarray(logits, jnp.float32), top_k, top_p)
  return set(np.flatnonzero(np.isfinite(np.asarray(z))).tolist())


def test_top_k_keeps_exactly_the_k_largest_and_ties():
  z = [0.0, 4.0, 1.0, 3.0, 2.0]
  assert _kept(z, top_k=1) == {1}
  assert _kept(z, top_k=2) == {1, 3}
  assert _kept(z, top_k=5) == _kept(z, top_k=50) == _kept(z, top_k=0) == set(range(5))
  # Ties with the k-th value are all kept (as HF's TopKLogitsWarper).
  assert _kept([1.0, 3.0, 3.0, 2.0], top_k=1) == {1, 2}
  assert _kept([1.0, 3.0, 2.0, 2.0], top_k=2) == {1, 2, 3}


def test_top_p_keeps_the_smallest_set_with_mass_at_least_p():
  probs = np.array([0.05, 0.5, 0.15, 0.3])
  z = np.log(probs)
  assert _kept(z, top_p=0.75) == {1, 3}         # 0.5 + 0.3 = 0.8 >= 0.75
  assert _kept(z, top_p=0.85) == {1, 3, 2}      # needs 0.95
  assert _kept(z, top_p=0.4) == {1}
  assert _kept(z, top_p=0.0) == {1}             # the top token is always kept
  assert _kept(z, top_p=1.0) == {0, 1, 2, 3}
  # top-p acts on the top-k-renormalized distribution: {1, 3} has mass 0.8,
  # renormalized 0.625 / 0.375, so p = 0.6 keeps only token 1.
  assert _kept(z, top_k=2, top_p=0.6) == {1}
  assert _kept(z, top_k=3, top_p=0.6) == {1, 3}  # 0.5/0.95 = 0.526 < 0.6


def test_truncation_matches_hf_warpers_on_random_logits():
  rng = np.random.default_rng(0)
  z = rng.normal(size=(64, 50)).astype(np.float32) * 2.0
  fn = jax.jit(sampler.truncate_logits)
  for k, p in [(0, 0.3), (0, 0.95), (5, 1.0), (10, 0.7), (1, 0.5), (49, 0.99)]:
    ref = torch.as_tensor(z)
    if k:
      ref = TopKLogitsWarper(k)(None, ref)
    if p < 1:
      ref = TopPLogitsWarper(p)(None, ref)
    got = np.asarray(fn(jnp.asarray(z), k, p))
    np.testing.assert_array_equal(np.isfinite(got), np.isfinite(ref.numpy()), err_msg=f"{k=} {p=}")
    np.testing.assert_array_equal(got[np.isfinite(got)], z[np.isfinite(got)])


# ----------------------------------------------------------------------------- compiles
def test_no_recompile_within_buckets_and_for_new_knobs(qwen2):
  key = jax.random.key(0)
  kw = dict(max_new_tokens=8, key=key)
  sampler.generate(qwen2, PROMPTS, temperature=0.0, **kw)
  before = dict(sampler.TRACE_COUNTS)
  # New prompts (4 rows, lengths 1..12: the buckets of PROMPTS, P = 12 and 4
  # prompts), new knobs, new EOS ids.
  prompts = [[1], [2] * 12, [3, 4, 5, 6, 7], list(range(10, 20))]
  for t, k, p, eos in [(1.0, 0, 1.0, None), (0.7, 5, 0.9, 3), (1.3, 40, 0.5, [4, 9]),
                       (0.0, 0, 1.0, 11)]:
    out = sampler.generate(qwen2, prompts, temperature=t, top_k=k, top_p=p, eos_id=eos,
                           **kw)
    assert out.tokens.shape == (4, 8)
  assert dict(sampler.TRACE_COUNTS) == before
  # The counter does see a new bucket: a 17-token prompt needs P = 20.
  sampler.generate(qwen2, [[1] * 17], temperature=1.0, **kw)
  assert sampler.TRACE_COUNTS["prefill"] == before["prefill"] + 1


# ----------------------------------------------------------------------------- mesh
def test_mesh_sharded_generation_matches_single_device(qwen2):
  mesh = make_mesh(data=4, fsdp=1, tensor=2)
  # The shapes of the log-prob test (its single-device programs are reused);
  # 4 prompts fill the batch bucket, so the output keeps its row sharding.
  kw = dict(max_new_tokens=10, temperature=1.0, top_k=30, num_samples=3, key=jax.random.key(5),
            eos_id=[7, 19], return_policy_logprobs=True)
  prompts = PROMPTS + [[8, 8, 8]]
  ref = sampler.generate(qwen2, prompts, **kw)
  got = sampler.generate(qwen2, prompts, mesh=mesh, **kw)
  np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(ref.tokens))
  np.testing.assert_array_equal(np.asarray(got.lengths), np.asarray(ref.lengths))
  np.testing.assert_allclose(np.asarray(got.logprobs), np.asarray(ref.logprobs), atol=1e-5)
  np.testing.assert_allclose(np.asarray(got.policy_logprobs), np.asarray(ref.policy_logprobs),
                             atol=1e-5)
  assert got.tokens.sharding.mesh.shape == mesh.shape
  rows = got.tokens.sharding.spec[0]
  assert "data" in ((rows,) if isinstance(rows, str) else tuple(rows))  # rows over data


# ----------------------------------------------------------------------------- validation
@pytest.mark.parametrize("kwargs,name", [
    (dict(prompts=[]), "prompts"),
    (dict(prompts=[[1, 2], []]), "prompts\\[1\\]"),
    (dict(prompts=[[1, V]]), "prompts\\[0\\]"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(num_samples=0), "num_samples"),
    (dict(temperature=-0.1), "temperature"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-1), "top_k"),
    (dict(eos_id=V), "eos_id"),
    (dict(key=0), "key"),
    (dict(prompts=[[1] * 9], prompt_buckets=(4, 8)), "prompts"),
])
def test_bad_input_names_the_argument(qwen2, kwargs, name):
  args = dict(prompts=[[1, 2]], max_new_tokens=4, key=jax.random.key(0))
  args.update(kwargs)
  with pytest.raises(ValueError, match=name):
    sampler.generate(qwen2, args.pop("prompts"), **args)
