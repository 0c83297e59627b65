"""jaxent.models against the transformers PyTorch models on tiny random checkpoints."""
import json
import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from jaxent import models, ops, sharding
from tests._hf_tiny import (FAMILIES, assert_remat_grads_match_torch, make_torch_model,
                             torch_logits)

B, T = 3, 12
RTOL, ATOL = 1e-4, 2e-5
_CACHE = {}
# One jitted apply shared by the tests (cfg static), so equal configs compile once.
_apply = jax.jit(models.apply, static_argnums=0, static_argnames="return_hidden")


def _ckpt(family, tmp_path_factory):
  """``(torch model, checkpoint dir, jaxent model)``, built once per module."""
  if family not in _CACHE:
    hf_cfg = FAMILIES[family]()
    tm = make_torch_model(hf_cfg, seed=len(_CACHE))
    path = tmp_path_factory.mktemp(family)
    tm.save_pretrained(path)
    _CACHE[family] = (tm, str(path), models.from_pretrained(path))
  return _CACHE[family]


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
  return (request.param, *_ckpt(request.param, tmp_path_factory))


# Masking and caching code is shared by all families; these three cover bias,
# llama3-scaled RoPE and q/k norm without compiling every family twice more.
@pytest.fixture(scope="module", params=["qwen2", "llama3", "qwen3"])
def family3(request, tmp_path_factory):
  return (request.param, *_ckpt(request.param, tmp_path_factory))


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
  return _ckpt("qwen2", tmp_path_factory)


def _tokens(seed=0, b=B, t=T, vocab=160):
  return np.random.RandomState(seed).randint(0, vocab, (b, t)).astype(np.int32)


def _left_padded(seed=1):
  """Tokens, mask (1 = real) and HF-style positions of rows with 12, 9, 5 real tokens."""
  tokens = _tokens(seed)
  lengths = [T, 9, 5]
  mask = np.zeros((B, T), np.int32)
  for b, n in enumerate(lengths):
    mask[b, T - n:] = 1
  tokens = np.where(mask == 1, tokens, 0).astype(np.int32)
  return tokens, mask, lengths


# ----------------------------------------------------------------------------- parity
def test_float32_logits_match_transformers(family):
  name, tm, _, m = family
  tokens = _tokens()
  np.testing.assert_allclose(np.asarray(m(tokens)), torch_logits(tm, tokens),
                             rtol=RTOL, atol=ATOL, err_msg=name)


def test_llama3_rope_scaling_is_applied(tmp_path_factory):
  # The scaling must change this model's logits, else the parity test above
  # could not tell whether it is honoured.
  tm, _, m = _ckpt("llama3", tmp_path_factory)
  tokens = _tokens()
  unscaled = models.Model(m.params, m.config.replace(rope_scaling=None))
  diff = np.abs(np.asarray(unscaled(tokens)) - torch_logits(tm, tokens)).max()
  assert diff > 1e-2
  inv = models.rope_inv_freq(m.config)
  ref = tm.model.rotary_emb.inv_freq.numpy()
  np.testing.assert_allclose(inv, ref, rtol=1e-6)


def test_padded_rows_equal_unpadded_rows(family3):
  name, tm, _, m = family3
  tokens, mask, lengths = _left_padded()
  out = np.asarray(m(tokens, attention_mask=mask))
  for b, n in enumerate(lengths):
    ref = torch_logits(tm, tokens[b:b + 1, T - n:])[0]
    np.testing.assert_allclose(out[b, T - n:], ref, rtol=RTOL, atol=ATOL, err_msg=f"{name} {b}")
  # Right padding: the real prefix does not see the pads (causality) either way.
  right = np.roll(tokens[2:], -(T - lengths[2]), axis=1)
  out_r = np.asarray(m(right, attention_mask=np.roll(mask[2:], -(T - lengths[2]), axis=1)))
  np.testing.assert_allclose(out_r[0, :lengths[2]], out[2, T - lengths[2]:],
                             rtol=RTOL, atol=ATOL)


def test_explicit_positions_match_transformers(qwen2):
  tm, _, m = qwen2
  tokens = _tokens(2)
  pos = np.arange(T)[None, :] + np.array([[0], [7], [30]])
  np.testing.assert_allclose(np.asarray(m(tokens, pos)), torch_logits(tm, tokens,
                                                                       position_ids=pos),
                             rtol=RTOL, atol=ATOL)


# ----------------------------------------------------------------------------- cache
def test_kv_cache_prefill_and_decode_match_full_forward(family3):
  name, _, _, m = family3
  cfg = m.config
  tokens, mask, _ = _left_padded(3)
  pos = np.asarray(models.default_positions(jnp.asarray(tokens), jnp.asarray(mask)))
  full = np.asarray(m(tokens, pos, attention_mask=mask))
  prefill = 6
  slots = T + 4  # spare slots stay empty: kv_mask True but never visible (causal)
  kv_mask = np.ones((B, slots), bool)
  kv_mask[:, :T] = mask.astype(bool)
  traces = []

  def counted(*args, **kw):
    traces.append(args[2].shape)
    return models.apply(*args, **kw)

  step = jax.jit(counted, static_argnums=0)
  cache = models.init_cache(cfg, B, slots)
  logits, cache = step(cfg, m.params, tokens[:, :prefill], pos[:, :prefill],
                       cache=cache, kv_mask=kv_mask)
  outs = [np.asarray(logits)]
  for t in range(prefill, T):
    logits, cache = step(cfg, m.params, tokens[:, t:t + 1], pos[:, t:t + 1],
                         cache=cache, kv_mask=kv_mask)
    outs.append(np.asarray(logits))
  assert int(cache.index) == T
  assert traces == [(B, prefill), (B, 1)]  # the cache index is traced: no retrace per step
  got = np.concatenate(outs, axis=1)
  real = mask.astype(bool)
  np.testing.assert_allclose(got[real], full[real], rtol=RTOL, atol=ATOL, err_msg=name)


def test_cache_attention_mask_equals_kv_mask(qwen2):
  # attention_mask with a cache marks the new slots: same as putting it in kv_mask.
  _, _, m = qwen2
  cfg = m.config
  tokens, mask, _ = _left_padded(4)
  pos = models.default_positions(jnp.asarray(tokens), jnp.asarray(mask))
  kv_mask = np.ones((B, T), bool)
  kv_mask[:, :T] = mask.astype(bool)
  a, ca = _apply(cfg, m.params, tokens, pos, cache=models.init_cache(cfg, B, T),
                 kv_mask=kv_mask)
  b, cb = _apply(cfg, m.params, tokens, pos, cache=models.init_cache(cfg, B, T),
                 attention_mask=mask)
  real = mask.astype(bool)
  np.testing.assert_allclose(np.asarray(a)[real], np.asarray(b)[real], rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(ca.k), np.asarray(cb.k))
  with pytest.raises(ValueError, match="cache overflow"):  # checked eagerly, before compute
    models.apply(cfg, m.params, tokens[:, :1], cache=cb)


def test_init_cache_layout():
  cfg = models.ModelConfig(model_type="llama", vocab_size=32, hidden_size=32, num_layers=3,
                           num_heads=4, num_kv_heads=2, intermediate_size=64, dtype="bfloat16")
  c = models.init_cache(cfg, 5, 7)
  assert c.k.shape == c.v.shape == (3, 5, 7, 2, 8) and c.k.dtype == jnp.bfloat16
  assert c.index.dtype == jnp.int32 and c.index.shape == ()
  assert models.init_cache(cfg, 1, 2, dtype="float32").k.dtype == jnp.float32
  axes = models.cache_logical_axes(cfg)
  assert axes.k == ("layers", "batch", "cache_seq", "kv_heads", "head_dim")


# ----------------------------------------------------------------------------- export
def test_export_loads_in_transformers_with_same_logits(family, tmp_path):
  name, _, _, m = family
  out = models.save_pretrained(m, tmp_path / "export")
  assert not any(f.endswith(".bin") for f in os.listdir(out))
  back = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
  tokens = _tokens(5)
  np.testing.assert_allclose(torch_logits(back, tokens), np.asarray(m(tokens)),
                             rtol=RTOL, atol=ATOL, err_msg=name)
  again = models.from_pretrained(out)
  assert again.config == m.config
  jax.tree.map(np.testing.assert_array_equal, again.params, m.params)


def test_random_init_exports_and_matches_transformers(tmp_path):
  # A config alone (Llama with attention_bias: biases on q/k/v and o).
  cfg = models.ModelConfig(model_type="llama", vocab_size=96, hidden_size=48, num_layers=2,
                           num_heads=6, num_kv_heads=2, intermediate_size=80, qkv_bias=True,
                           rope_theta=1e4, tie_word_embeddings=False, eos_token_id=[1, 2])
  m = models.init_model(cfg, seed=3)
  assert cfg.o_bias
  w = np.asarray(m.params["layers"]["q_kernel"])
  assert abs(w.std() - cfg.initializer_range) < 0.1 * cfg.initializer_range
  # Biases init to zero; give them values so the export is checked on them.
  params = jax.tree.map(lambda x: x, m.params)
  for k in ("q_bias", "k_bias", "v_bias", "o_bias"):
    params["layers"][k] = 0.1 * jax.random.normal(jax.random.key(len(k)),
                                                  params["layers"][k].shape)
  m = m.replace(params=params)
  tok = transformers.PreTrainedTokenizerFast(
      tokenizer_object=__import__("tokenizers").Tokenizer(
          __import__("tokenizers").models.WordLevel({"a": 0, "b": 1, "<unk>": 2}, "<unk>")))
  out = models.save_pretrained(m, tmp_path, tokenizer=tok)
  back = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
  assert type(back).__name__ == "LlamaForCausalLM"
  assert back.config.attention_bias and back.config.eos_token_id == [1, 2]
  tokens = _tokens(6, b=2, t=7, vocab=96)
  np.testing.assert_allclose(np.asarray(m(tokens)), torch_logits(back, tokens),
                             rtol=RTOL, atol=ATOL)
  assert models.load_tokenizer(out).convert_tokens_to_ids("b") == 1


def test_sharded_safetensors_checkpoint(tmp_path, tmp_path_factory):
  tm, _, m = _ckpt("qwen2", tmp_path_factory)
  tm.save_pretrained(tmp_path, max_shard_size="40KB")
  assert os.path.exists(tmp_path / "model.safetensors.index.json")
  shards = [f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]
  assert len(shards) > 1
  loaded = models.from_pretrained(tmp_path)
  jax.tree.map(np.testing.assert_array_equal, loaded.params, m.params)


# ----------------------------------------------------------------------------- bfloat16
def test_bfloat16_close_to_float32(qwen2):
  tm, path, m32 = qwen2
  m16 = models.from_pretrained(path, dtype="bfloat16")
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(m16.params))
  tokens = _tokens(7)
  l32, l16 = np.asarray(m32(tokens)), np.asarray(m16(tokens))
  assert l16.dtype == np.float32
  scale = np.abs(l32).max()
  assert np.abs(l16 - l32).max() < 0.05 * scale
  assert np.mean(l16.argmax(-1) == l32.argmax(-1)) > 0.9
  # bfloat16 really ran: not bit-identical to float32
  assert np.abs(l16 - l32).max() > 1e-4 * scale


# ----------------------------------------------------------------------------- misc API
def test_return_hidden_gives_logits_factors(qwen2):
  _, _, m = qwen2
  tokens = _tokens(8)
  out, cache = _apply(m.config, m.params, tokens, return_hidden=True)
  assert isinstance(out, ops.HiddenAndHead)
  hidden, kernel = out
  assert cache is None and hidden.shape == (B, T, 64) and kernel.shape == (64, 160)
  np.testing.assert_allclose(np.asarray(hidden @ kernel), np.asarray(m(tokens)),
                             rtol=1e-5, atol=1e-5)


def test_remat_gradients_match_torch_autograd(tmp_path, tmp_path_factory):
  # Gradients (under jax.checkpoint) against torch autograd, mapped to our
  # layout by writing them as a checkpoint and loading it.
  tm, path, m = _ckpt("smollm2", tmp_path_factory)
  tokens, mask, _ = _left_padded(9)
  assert_remat_grads_match_torch(tm, m, tokens, mask, tmp_path)


def test_logical_axes_shard_forward_on_mesh(tmp_path_factory):
  _, _, m = _ckpt("qwen3", tmp_path_factory)
  cfg = m.config
  axes = models.param_logical_axes(cfg)
  assert jax.tree.structure(axes, is_leaf=lambda x: isinstance(x, tuple)) == \
      jax.tree.structure(m.params)
  for ax, x in zip(jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, tuple)),
                   jax.tree.leaves(m.params)):
    assert len(ax) == x.ndim and all(a in sharding.LOGICAL_RULES for a in ax)
  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
  shardings = jax.tree.map(lambda ax: sharding.named_sharding(mesh, ax), axes,
                           is_leaf=lambda x: isinstance(x, tuple))
  params = jax.device_put(m.params, shardings)
  assert params["layers"]["q_kernel"].sharding.spec == sharding.logical_to_spec(
      ("layers", "embed", "heads", "head_dim"))
  tokens = _tokens(10, b=4)
  with jax.set_mesh(mesh):
    tok = jax.device_put(tokens, sharding.named_sharding(mesh, ("batch", "seq")))
    f = jax.jit(models.apply, static_argnums=0)
    logits, _ = f(cfg, params, tok)
    hlo = f.lower(cfg, params, tok).compile().as_text()
  np.testing.assert_allclose(np.asarray(logits), np.asarray(m(tokens)), rtol=1e-5, atol=1e-5)
  # The embedding lookup keeps the activations split by rows: no device gathers the whole
  # [B, T, D] batch (an embed-sharded table made XLA replicate it: "involuntary full
  # rematerialization").
  b, t = tokens.shape
  whole_batch = re.compile(rf"= \w+\[{b},{t},\d+\]\S* all-gather\(")
  assert not [l for l in hlo.splitlines() if whole_batch.search(l)]


def test_model_call_does_not_recompile(qwen2):
  _, _, m = qwen2
  m(_tokens(11))
  n = models._model._apply_jit._cache_size()
  m(_tokens(12))
  m.replace(params=jax.tree.map(lambda x: x * 1.0, m.params))(_tokens(13))
  assert models._model._apply_jit._cache_size() == n


def test_config_from_hf_to_hf_round_trip():
  for name, make in FAMILIES.items():
    cfg = models.ModelConfig.from_hf(make())
    assert models.ModelConfig.from_hf(cfg.to_hf()) == cfg, name
    hash(cfg)
  c = models.ModelConfig.from_hf(FAMILIES["qwen3"]())
  assert c.qk_norm and c.head_dim == 24 and not c.qkv_bias
  c = models.ModelConfig.from_hf(FAMILIES["qwen2"]())
  assert c.qkv_bias and not c.o_bias and c.rope_theta == 1e6 and c.rope_scaling is None


def test_config_validation_messages():
  base = dict(vocab_size=32, hidden_size=32, num_layers=1, num_heads=4, intermediate_size=8)
  with pytest.raises(ValueError, match="supported: qwen2, llama, qwen3"):
    models.ModelConfig(model_type="gpt2", **base)
  with pytest.raises(ValueError, match="num_kv_heads"):
    models.ModelConfig(model_type="llama", num_kv_heads=3, **base)
  with pytest.raises(ValueError, match="qkv_bias=True"):
    models.ModelConfig(model_type="qwen2", qkv_bias=False, **base)
  with pytest.raises(ValueError, match="'yarn' is not supported"):
    models.ModelConfig(model_type="llama", rope_scaling={"rope_type": "yarn", "factor": 4.0},
                       **base)
  with pytest.raises(ValueError, match="dtype"):
    models.ModelConfig(model_type="llama", dtype="int8", **base)
  hf = dict(vocab_size=32, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
            intermediate_size=8)
  with pytest.raises(ValueError, match="sliding-window"):
    models.ModelConfig.from_hf(transformers.Qwen2Config(**hf, use_sliding_window=True,
                                                        sliding_window=4))
  with pytest.raises(ValueError, match="mlp_bias"):
    models.ModelConfig.from_hf(transformers.LlamaConfig(**hf, mlp_bias=True))
  with pytest.raises(ValueError, match="'yarn' is not supported"):
    models.ModelConfig.from_hf(transformers.LlamaConfig(
        **hf, rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4,
                               "original_max_position_embeddings": 64}))


# ----------------------------------------------------------------------------- bad input
def test_bad_checkpoints_are_refused_with_names(tmp_path, tmp_path_factory):
  _, path, _ = _ckpt("qwen2", tmp_path_factory)

  def copy(name):
    d = tmp_path / name
    shutil.copytree(path, d)
    return d

  with pytest.raises(FileNotFoundError, match="nope"):
    models.from_pretrained(tmp_path / "nope")
  d = copy("noconfig")
  os.remove(d / "config.json")
  with pytest.raises(FileNotFoundError, match="config.json"):
    models.from_pretrained(d)
  d = copy("gpt2")
  cfg = json.loads((d / "config.json").read_text())
  (d / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2",
                                             "auto_map": {"AutoConfig": "evil.Config"}}))
  with pytest.raises(ValueError, match="'gpt2' is not supported; supported: qwen2, llama, qwen3"):
    models.from_pretrained(d)
  d = copy("pickle")
  os.remove(d / "model.safetensors")
  (d / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
  with pytest.raises(ValueError, match="pytorch_model.bin.*safetensors only"):
    models.from_pretrained(d)
  os.remove(d / "pytorch_model.bin")
  with pytest.raises(FileNotFoundError, match="model.safetensors"):
    models.from_pretrained(d)

  tensors = load_file(os.path.join(path, "model.safetensors"))
  d = copy("shape")
  bad = dict(tensors)
  bad["model.layers.1.mlp.up_proj.weight"] = np.zeros((95, 64), np.float32)
  save_file(bad, str(d / "model.safetensors"), metadata={"format": "pt"})
  with pytest.raises(ValueError, match=r"'model.layers.1.mlp.up_proj.weight' has shape \(95, 64\)"):
    models.from_pretrained(d)
  bad = dict(tensors)
  del bad["model.layers.0.self_attn.k_proj.bias"]
  bad["model.extra.weight"] = np.zeros((2,), np.float32)
  save_file(bad, str(d / "model.safetensors"), metadata={"format": "pt"})
  with pytest.raises(ValueError, match="missing tensors.*layers.0.self_attn.k_proj.bias"
                                       ".*unexpected tensors.*model.extra.weight"):
    models.from_pretrained(d)

  d = copy("shards")
  (d / "model.safetensors.index.json").write_text(json.dumps(
      {"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}))
  with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
    models.from_pretrained(d)
  with pytest.raises(FileNotFoundError, match="tokenizer"):
    models.load_tokenizer(path)
