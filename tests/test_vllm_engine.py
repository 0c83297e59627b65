"""The vLLM rollout engine (``rollout.engine: vllm``) against jaxent's own sampler and forward.

The first test always runs (no vllm needed): choosing the engine without the
package gives one clear error. The rest need the optional ``vllm`` package
(docs/VLLM.md: the CPU build in its own venv) and skip without it.
"""
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxent import models, rollout, sampler
from jaxent.errors import SetupError

R = 8
PROMPTS = [[1, 2, 3], [5, 6, 7, 8, 9], [11], [20, 21, 22, 23]]


def test_vllm_engine_without_the_package_names_package_and_extra(monkeypatch, tmp_path, capsys):
  """``sys.modules['vllm'] = None`` makes ``import vllm`` fail as on a machine without it."""
  import yaml

  from jaxent import cli
  from jaxent.config import RolloutConfig
  from tests._tiny import loop_config

  monkeypatch.setitem(sys.modules, "vllm", None)
  RolloutConfig(engine="vllm").validate()          # a valid setting; the package is checked at start
  with pytest.raises(SetupError, match=r"vllm package.*pip install 'jaxent\[vllm\]'"):
    rollout.make_engine("vllm")
  cfg = tmp_path / "c.yaml"
  cfg.write_text(yaml.safe_dump(loop_config(rollout={"engine": "vllm"})))
  assert cli.main(["train", str(cfg), "--run-dir", str(tmp_path / "run")]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "jaxent[vllm]" in err[0] and "vllm package" in err[0]


@pytest.mark.parametrize("bad", [dict(vllm_dtype="float16"), dict(vllm_kv_cache_bytes=0),
                                 dict(vllm_max_model_len=-1), dict(engine="sglang")])
def test_bad_vllm_settings_name_the_key(bad):
  from jaxent.config import RolloutConfig
  from jaxent.errors import ConfigError

  with pytest.raises(ConfigError, match=f"rollout.{next(iter(bad))}"):
    RolloutConfig(**bad).validate()


# ----------------------------------------------------------------------------- with vllm
def _need_vllm():
  pytest.importorskip("vllm")


def _model(model_type, tied, seed, dtype="float32"):
  """A 2-layer model, head_dim 32 (a size vLLM's CPU attention supports), weights scaled up
  so the logits are well separated (no greedy near-ties between two implementations)."""
  cfg = models.ModelConfig(model_type=model_type, vocab_size=128, hidden_size=64, num_layers=2,
                           num_heads=2, num_kv_heads=1, head_dim=32, intermediate_size=96,
                           tie_word_embeddings=tied, dtype=dtype, param_dtype="float32")
  m = models.init_model(cfg, seed=seed)
  return models.Model(params=jax.tree.map(lambda x: x * 5.0 if x.ndim > 1 else x, m.params),
                      config=cfg)


@pytest.fixture(scope="module", params=[("qwen2", True), ("llama", False)],
                ids=["qwen2-tied", "llama-untied"])
def engine_and_family(request):
  _need_vllm()
  eng = rollout.make_engine("vllm", vllm_kv_cache_bytes=64 << 20, vllm_max_model_len=64)
  yield eng, request.param
  eng.close()


def test_kv_budget_beyond_memory_or_below_one_sequence_is_a_setup_error():
  _need_vllm()
  m = _model("qwen2", True, seed=0)
  dec = rollout.Decoding(4)
  eng = rollout.make_engine("vllm", vllm_kv_cache_bytes=1 << 60)
  with pytest.raises(SetupError, match=r"vllm_kv_cache_bytes = 1152921504606846976 is more than"):
    eng.generate(m, PROMPTS, dec, num_samples=1, key=jax.random.key(0))
  eng = rollout.make_engine("vllm", vllm_kv_cache_bytes=1000, vllm_max_model_len=64)
  with pytest.raises(SetupError, match=r"vllm_kv_cache_bytes = 1000 and max_model_len 64: No avail"):
    eng.generate(m, PROMPTS, dec, num_samples=1, key=jax.random.key(0))
  assert eng._dir is None                                   # its weight directory is removed


def _static(model, decoding, n, key, **kw):
  return sampler.generate(model, PROMPTS, max_new_tokens=decoding.max_new_tokens,
                          temperature=decoding.temperature, top_k=decoding.top_k,
                          top_p=decoding.top_p, eos_id=decoding.eos_id, num_samples=n, key=key, **kw)


def test_greedy_tokens_equal_the_static_engine_before_and_after_a_weight_update(engine_and_family):
  eng, (family, tied) = engine_and_family
  m0 = _model(family, tied, seed=0)
  ref0 = _static(m0, rollout.Decoding(R, temperature=0.0), 2, jax.random.key(0))
  # An EOS that some rows draw mid-response: the row ends there, EOS included.
  toks0 = np.asarray(ref0.tokens)
  eos = int(toks0[0, 3])
  dec = rollout.Decoding(R, temperature=0.0, eos_id=eos)
  for seed in (0, 1):                                       # initial weights, then an update
    m = m0 if seed == 0 else _model(family, tied, seed=1)
    if seed:
      assert eng.sync(m) > 0
    ref = _static(m, dec, 2, jax.random.key(0))
    out = eng.generate(m, PROMPTS, dec, num_samples=2, key=jax.random.key(3))
    np.testing.assert_array_equal(np.asarray(out.mask), np.asarray(ref.mask))
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(ref.tokens))
    np.testing.assert_array_equal(np.asarray(out.logprobs), 0.0)   # greedy: a point mass
    if seed == 0:
      assert np.asarray(ref.mask)[0].sum() == 4                    # row 0 stops at its EOS
  # Different weights give different tokens (the update reached the engine).
  assert not np.array_equal(np.asarray(out.tokens), toks0)


def _transformers_greedy(path, prompts, r, eos):
  """Greedy continuations by transformers' PyTorch model read from the HF directory ``path``
  (float32, one prompt per call: no padding); a row stops after ``eos`` when it is not None."""
  import torch
  import transformers

  hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
  rows = []
  with torch.no_grad():
    for p in prompts:
      ids = torch.tensor([p])
      out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=r,
                        min_new_tokens=0, do_sample=False, eos_token_id=eos, pad_token_id=0)
      rows.append(out[0, len(p):].tolist())
  return rows


def test_greedy_tokens_equal_transformers_on_the_same_checkpoint_before_and_after_an_update(
    engine_and_family, tmp_path):
  """The HF directory ``models.save_pretrained`` writes (what the engine starts from) read by
  transformers and by jaxent; the engine gets jaxent's copy (a start or a sync), then other
  weights through a sync. Rows stop at an EOS that some rows draw mid-response."""
  eng, (family, tied) = engine_and_family
  for seed in (6, 7):
    path = models.save_pretrained(_model(family, tied, seed=seed), tmp_path / f"w{seed}")
    m = models.from_pretrained(path, dtype="float32", param_dtype="float32")
    free = _transformers_greedy(path, PROMPTS, R, eos=None)
    assert all(len(t) == R for t in free)
    eos = free[0][3]
    ref = _transformers_greedy(path, PROMPTS, R, eos=eos)
    assert len(ref[0]) == 4 and ref[0][-1] == eos                 # row 0 stops at its EOS
    if seed == 7:
      assert eng.sync(m) > 0                                      # a weight update, in place
    out = eng.generate(m, PROMPTS, rollout.Decoding(R, temperature=0.0, eos_id=eos),
                       num_samples=1, key=jax.random.key(0))
    toks, mask = np.asarray(out.tokens), np.asarray(out.mask)
    for row, want in enumerate(ref):
      assert mask[row].sum() == len(want)
      assert toks[row, :len(want)].tolist() == want, (seed, row)
    if seed == 6:
      first = free
  assert free != first                                            # the update changed the output


def _teacher_forced_logprobs(model, prompt, resp, temperature, top_k, top_p):
  """log pi_trunc(y_t) of each response token: jaxent's forward, scaled and truncated."""
  toks = jnp.asarray([list(prompt) + list(resp)], jnp.int32)
  logits = models.apply(model.config, model.params, toks)[0][0, len(prompt) - 1:-1]
  z = sampler.truncate_logits(sampler.scale_logits(logits.astype(jnp.float32), temperature),
                              top_k, top_p)
  lp = jax.nn.log_softmax(z, axis=-1)
  return np.asarray(lp[jnp.arange(len(resp)), jnp.asarray(resp)])


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 20, 0.9)])
def test_logprobs_of_the_sampled_distribution_match_a_teacher_forced_forward(
    engine_and_family, temperature, top_k, top_p):
  eng, (family, tied) = engine_and_family
  m = _model(family, tied, seed=2)
  dec = rollout.Decoding(R, temperature=temperature, top_k=top_k, top_p=top_p)
  n = 3
  out = eng.generate(m, PROMPTS, dec, num_samples=n, key=jax.random.key(5))
  toks, lps, mask = (np.asarray(x) for x in out)
  assert toks.shape == lps.shape == mask.shape == (len(PROMPTS) * n, R)
  assert (mask == 1).all()                                   # no EOS: every row runs R tokens
  for row in range(len(PROMPTS) * n):
    ref = _teacher_forced_logprobs(m, PROMPTS[row // n], toks[row], temperature, top_k, top_p)
    assert np.isfinite(ref).all()                            # every drawn token was in the kept set
    np.testing.assert_allclose(lps[row], ref, atol=2e-4, rtol=0)
  # Rows of one prompt are distinct draws; the same key reproduces them, another key does not.
  assert len({tuple(t) for t in toks[:n]}) > 1
  again = eng.generate(m, PROMPTS, dec, num_samples=n, key=jax.random.key(5))
  np.testing.assert_array_equal(np.asarray(again.tokens), toks)
  other = eng.generate(m, PROMPTS, dec, num_samples=n, key=jax.random.key(6))
  assert not np.array_equal(np.asarray(other.tokens), toks)


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (2.0, 8, 0.9)])
def test_first_token_frequencies_follow_the_sampled_distribution(engine_and_family, temperature,
                                                                 top_k, top_p):
  """Chi-square of 4096 first tokens (one prompt, per-row seeds) against jaxent's softmax of
  the scaled, truncated logits; tokens outside the kept set never appear."""
  from scipy import stats

  eng, (family, tied) = engine_and_family
  m = _model(family, tied, seed=3)
  m = models.Model(params=jax.tree.map(lambda x: x / 4.0 if x.ndim > 1 else x, m.params),
                   config=m.config)                         # a flatter distribution
  n = 4096
  out = eng.generate(m, [PROMPTS[1]], rollout.Decoding(1, temperature=temperature, top_k=top_k,
                                                       top_p=top_p), num_samples=n,
                     key=jax.random.key(11))
  first = np.asarray(out.tokens)[:, 0]
  logits = models.apply(m.config, m.params, jnp.asarray([PROMPTS[1]]))[0][0, -1]
  z = sampler.truncate_logits(sampler.scale_logits(logits, temperature), top_k, top_p)
  p = np.asarray(jax.nn.softmax(z), np.float64)
  p /= p.sum()                                              # float32 softmax -> exact sum 1
  assert (p[first] > 0).all()                               # only kept tokens are drawn
  counts = np.bincount(first, minlength=p.size).astype(np.float64)
  big = p * n >= 5                                          # pool the rare tokens into one bin
  obs = np.append(counts[big], counts[~big].sum())
  exp = np.append(p[big] * n, p[~big].sum() * n)
  keep = exp > 0
  assert big.sum() >= 4
  assert stats.chisquare(obs[keep], exp[keep]).pvalue > 1e-3


def test_bfloat16_engine_logprobs_within_bfloat16_tolerance():
  _need_vllm()
  eng = rollout.make_engine("vllm", vllm_dtype="bfloat16", vllm_kv_cache_bytes=64 << 20,
                            vllm_max_model_len=64)
  try:
    m = _model("qwen2", True, seed=4)
    dec = rollout.Decoding(R, temperature=1.0)
    eng.sync(models.Model(params=_model("qwen2", True, seed=5).params, config=m.config))
    eng.sync(m)                                               # a bf16 update (uint16 view) lands
    out = eng.generate(m, PROMPTS, dec, num_samples=2, key=jax.random.key(1))
    toks, lps = np.asarray(out.tokens), np.asarray(out.logprobs)
    gaps = [np.abs(lps[r] - _teacher_forced_logprobs(m, PROMPTS[r // 2], toks[r], 1.0, 0, 1.0))
            for r in range(len(toks))]
    gap = np.concatenate(gaps)
    # bf16 weights/activations vs the fp32 forward: ~1e-2 per token, never O(1).
    assert gap.mean() < 0.1 and gap.max() < 0.5, (gap.mean(), gap.max())
    assert gap.mean() > 1e-5                                  # it did compute in bf16
  finally:
    eng.close()


def test_two_rl_steps_with_the_vllm_engine_train_log_the_gap_and_resume_exactly(tmp_path):
  _need_vllm()
  from jaxent import config as C
  from jaxent.train import _build, _loop
  from tests._tiny import loop_config

  arch = {"model_type": "qwen2", "hidden_size": 64, "num_layers": 1, "num_heads": 2,
          "num_kv_heads": 1, "head_dim": 32, "intermediate_size": 64, "tie_word_embeddings": True}
  # The tiny policy earns no reward: an entropy bonus gives the updates a real gradient.
  raw = loop_config(model={"arch": arch}, train={"steps": 2, "ckpt_every": 1},
                    loss={"entropy_coef": 0.01},
                    rollout={"engine": "vllm", "vllm_kv_cache_bytes": 64 << 20,
                             "vllm_max_model_len": 128})

  def run(name, steps, resume=False):
    cfg = C.from_dict(raw, [f"train.steps={steps}"])
    run_dir = str(tmp_path / name)
    return _loop.train(cfg, run_dir, _build.build_components(cfg, run_dir), resume=resume)

  res = run("full", 2)
  rows = res.history
  assert [r["step"] for r in rows] == [1, 2]
  for r in rows:
    assert np.isfinite(r["grad_norm"]) and r["grad_norm"] > 0
    assert r["weight_sync_s"] > 0
    # fp32 engine, no truncation: its log-probs are the trainer's old log-probs (of the
    # current params) up to float32 rounding of two implementations (measured ~3e-7). At
    # step 2 this holds only if the engine generated with the params of step 1's update.
    assert 0 <= r["rollout_logprob_diff_max"] < 1e-5, r["rollout_logprob_diff_max"]
  # Stop after step 1, resume (a fresh engine from the checkpoint's params): the same
  # seeds and weights give the same rollouts, so the same metrics and parameters.
  run("split", 1)
  res2 = run("split", 2, resume=True)
  timing = ("step_time_s", "sample_time_s", "tokens_per_s", "weight_sync_s")
  strip = lambda r: {k: v for k, v in r.items() if k not in timing}  # noqa: E731
  assert strip(res2.history[-1]) == strip(rows[-1])
  for a, b in zip(jax.tree.leaves(res.state.params), jax.tree.leaves(res2.state.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def digit_fraction(response: str, answer: str) -> float:
  """A reward a random policy earns in part: the fraction of the response's characters that
  are digits (it depends on the sampled tokens' distribution, unlike a 0/1 grade that a
  random policy never earns)."""
  del answer
  return sum(c.isdigit() for c in response) / max(len(response), 1)


def test_vllm_run_metrics_match_a_native_run_in_distribution(tmp_path):
  """Reward, entropy, log-prob and response length of a ``jaxent train`` run with
  ``engine: vllm`` against the same run with the native engine, as statistics over
  independent rollouts.

  Both runs sample the same initial policy at every step: the learning rate (1e-12) moves no
  parameter by more than float32 resolution (asserted), so each step's rollout is an
  independent draw (its own step key, its own prompts from the data order, the same in the
  two runs) of one distribution, and the step's metrics are one replication. The engines'
  tokens differ (two samplers); their per-step means must agree: |mean_vllm - mean_native|
  <= 4 standard errors (Welch, from the per-step values; |t| > 4 at ~14 degrees of freedom
  has probability ~1e-3 per metric) + 1e-4 (fp32 engine and trainer: logits equal to ~1e-6).
  ``log_prob`` (the trainer's mean log pi of the sampled tokens) is the metric a sampler
  mismatch moves most: E_{y~q}[log pi(y)] = -H(pi) only for q = pi. The policy is the tiny
  model with weights scaled x12, far from uniform (entropy ~1.7 nats of log 15 = 2.7):
  an engine sampling at T = 2 for the configured 1 moves ``log_prob`` by ~0.9, about 30
  standard errors, and T = 1.1 by 0.16, 7.7 standard errors (measured: the test fails).
  """
  _need_vllm()
  from jaxent import config as C
  from jaxent import rewards
  from jaxent.train import _build, _loop
  from tests._tiny import loop_config, metrics_rows

  if "test_digit_fraction" not in rewards.reward_names():
    rewards.register_reward("test_digit_fraction", digit_fraction, isolated=False)
  arch = {"model_type": "qwen2", "hidden_size": 64, "num_layers": 1, "num_heads": 2,
          "num_kv_heads": 1, "head_dim": 32, "intermediate_size": 64, "tie_word_embeddings": True}
  steps = 8
  raw = loop_config(model={"arch": arch},
                    rollout={"prompts_per_step": 16, "samples_per_prompt": 8, "max_new_tokens": 8,
                             "reward": "test_digit_fraction", "vllm_kv_cache_bytes": 64 << 20,
                             "vllm_max_model_len": 64},
                    loss={"name": "ppo_clip"}, optim={"lr": 1e-12},
                    train={"steps": steps, "mini_batches": 1, "eval_every": 0, "ckpt_every": 0})

  def run(engine):
    cfg = C.from_dict(raw, [f"rollout.engine={engine}"])
    run_dir = str(tmp_path / engine)
    comps = _build.build_components(cfg, run_dir)
    init = jax.tree.map(lambda x: x * 12.0 if x.ndim > 1 else x, comps.params)
    comps.params = init
    res = _loop.train(cfg, run_dir, comps)
    for a, b in zip(jax.tree.leaves(init), jax.tree.leaves(res.state.params)):
      assert np.abs(np.asarray(a) - np.asarray(b)).max() < 1e-9   # the policy did not move
    rows = metrics_rows(run_dir)
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    return rows

  native, vllm_rows = run("continuous"), run("vllm")
  for name in ("reward_mean", "entropy", "log_prob", "response_len_mean"):
    x = np.array([r[name] for r in vllm_rows], np.float64)
    y = np.array([r[name] for r in native], np.float64)
    assert not np.array_equal(x, y)                           # different samplers, other tokens
    se = np.sqrt(x.var(ddof=1) / len(x) + y.var(ddof=1) / len(y))
    diff = abs(x.mean() - y.mean())
    assert diff <= 4 * se + 1e-4, (name, x.mean(), y.mean(), se)
  assert 0.2 < np.mean([r["reward_mean"] for r in native]) < 0.95   # the reward varies
