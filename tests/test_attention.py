"""Query-chunked attention (``models.attention``, ``ModelConfig.attention_chunk``).

References: a float64 NumPy attention and its hand-derived gradients (with
the uniform softmax of a query that sees no key written as its own case, not
through the float32-min trick); the whole-attention path; the transformers
PyTorch model (logits of a left-padded batch, parameter gradients by autograd,
and greedy generation through the sampler's chunked prefill); the compiled HLO's buffer shapes and XLA's
temp memory for the forward + backward pass.
"""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxent import config as C
from jaxent import models, sampler, sharding

from tests._hf_tiny import (FAMILIES, assert_remat_grads_match_torch, make_torch_model,
                             torch_logits)

B, T, H, K, N = 3, 13, 4, 2, 8
CHUNK = 5  # 13 = 2 chunks of 5 + a tail of 3
RTOL, ATOL = 1e-5, 1e-6


# ----------------------------------------------------------------------------- reference
def _ref_attention(q, k, v, mask, ct):
  """float64 ``(out, dq, dk, dv)`` of ``sum(out * ct)``; a query with no visible key
  attends uniformly to all S slots (its scores get no gradient)."""
  q, k, v, ct = (np.asarray(x, np.float64) for x in (q, k, v, ct))
  mask = np.broadcast_to(np.asarray(mask, bool), (q.shape[0],) + mask.shape[1:])
  g = q.shape[2] // k.shape[2]
  kh, vh = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)     # head h uses kv head h // G
  scale = q.shape[-1] ** -0.5
  s = np.einsum("bthn,bshn->bhts", q, kh) * scale
  m = mask[:, None]
  z = np.where(m, s, -np.inf)
  seen = m.any(-1, keepdims=True)
  e = np.exp(z - np.where(seen, z.max(-1, keepdims=True), 0.0))
  p = np.where(seen, e / np.where(seen, e.sum(-1, keepdims=True), 1.0), 1.0 / s.shape[-1])
  out = np.einsum("bhts,bshn->bthn", p, vh)
  dv = np.einsum("bhts,bthn->bshn", p, ct)
  dp = np.einsum("bthn,bshn->bhts", ct, vh)
  ds = np.where(m, p * (dp - (p * dp).sum(-1, keepdims=True)), 0.0)
  dq = np.einsum("bhts,bshn->bthn", ds, kh) * scale
  dk = np.einsum("bhts,bthn->bshn", ds, q) * scale
  fold = lambda x: x.reshape(x.shape[:2] + (k.shape[2], g, x.shape[-1])).sum(3)  # noqa: E731
  return out, dq, fold(dk), fold(dv)


def _masks():
  """bool masks as ``models.apply`` builds them: causal (batch-broadcast), causal with
  left padding (rows of 13, 9, 4 real tokens), and a cache of 20 slots written at index
  3 with left-padded prompt slots (query t is slot 3 + t)."""
  causal = np.tril(np.ones((T, T), bool))
  valid = np.arange(T)[None, :] >= T - np.array([T, 9, 4])[:, None]
  s, index = 20, 3
  kv_valid = np.ones((B, s), bool)
  kv_valid[1, :2] = kv_valid[2, :6] = False
  cache = (np.arange(s)[None, :] <= index + np.arange(T)[:, None])[None] & kv_valid[:, None, :]
  return {"causal": causal[None], "left_padded": causal[None] & valid[:, None, :], "cache": cache}


MASKS = _masks()


@jax.jit
def _outputs_and_grads(q, k, v, mask, ct):
  """``{q_chunk: (out, (dq, dk, dv))}`` for the whole and the chunked path (one compile)."""
  res = {}
  for chunk in (0, CHUNK):
    def loss(q, k, v, chunk=chunk):
      out = models.attention(q, k, v, mask, q_chunk=chunk)
      return jnp.sum(out * ct), out
    (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    res[chunk] = (out, grads)
  return res


@pytest.mark.parametrize("kind", sorted(MASKS))
def test_chunked_attention_matches_float64_reference_and_whole(kind):
  mask = MASKS[kind]
  s = mask.shape[-1]
  rng = np.random.RandomState(len(kind))
  q = rng.randn(B, T, H, N).astype(np.float32)
  k, v = rng.randn(2, B, s, K, N).astype(np.float32)
  ct = rng.randn(B, T, H, N).astype(np.float32)
  if kind != "causal":  # left-pad queries see no key: the uniform-softmax rule is exercised
    assert not mask.any(-1).all()
  ref = _ref_attention(q, k, v, mask, ct)
  res = _outputs_and_grads(q, k, v, mask, ct)
  (out_c, grads_c), (out_w, grads_w) = res[CHUNK], res[0]
  for name, got, want, whole in zip(("out", "dq", "dk", "dv"), (out_c, *grads_c), ref,
                                    (out_w, *grads_w)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, err_msg=f"{kind} {name} vs f64")
    np.testing.assert_allclose(got, whole, rtol=RTOL, atol=ATOL, err_msg=f"{kind} {name} vs whole")


def test_cache_spans_are_static_prefixes_ending_at_the_cache_size():
  assert models.cache_spans(80) == (16, 32, 48, 64, 80)
  assert models.cache_spans(9216) == tuple(range(1152, 9217, 1152))
  assert models.cache_spans(16) == (16,) and models.cache_spans(1) == (1,)
  assert models.cache_spans(17) == (16, 17)
  for slots in range(1, 300):
    spans = models.cache_spans(slots)
    assert spans[-1] == slots and len(spans) <= 8 and list(spans) == sorted(set(spans))


@pytest.mark.parametrize("t", [1, 4])
def test_cached_attention_reads_only_the_written_prefix(t):
  # A stacked cache of 80 slots (spans 16, 32, ..., 80) with queries at slots
  # live-t .. live-1. Slots past the chosen span hold NaN: whole-cache attention
  # would return NaN (0 * NaN), so a finite result equal to the float64
  # reference over the first `live` slots shows they were never read. Slots
  # between `live` and the span hold large finite garbage (read, probability 0).
  layers, s, layer = 3, 80, 1
  rng = np.random.RandomState(t)
  q = rng.randn(B, t, H, N).astype(np.float32)
  traces = []

  @jax.jit
  def run(q, ck, cv, mask, live):
    traces.append(1)
    return models.cached_attention(q, ck, cv, jnp.int32(layer), mask, live)

  for live in (t, 16, 17, 33, 64, 80):
    span = next(x for x in (16, 32, 48, 64, 80) if x >= live)  # cache_spans(80)
    ck, cv = rng.randn(2, layers, B, s, K, N).astype(np.float32)
    for c in (ck, cv):
      c[:, :, live:span] = 1e30
      c[:, :, span:] = np.nan
    kv_valid = rng.rand(B, s) < 0.7
    kv_valid[:, 0] = True                      # every query sees a key
    slots = live - t + np.arange(t)
    mask = (np.arange(s)[None, :] <= slots[:, None])[None] & kv_valid[:, None, :]
    got = run(q, ck, cv, mask, jnp.int32(live))
    want = _ref_attention(q, ck[layer, :, :live], cv[layer, :, :live], mask[..., :live],
                          np.zeros_like(q))[0]
    assert np.isfinite(np.asarray(got)).all(), live
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, err_msg=f"live={live}")
  assert len(traces) == 1  # live is traced: one compile for every position


def test_cached_attention_branches_on_cpu_and_tpu_and_reads_the_whole_cache_on_gpu():
  # XLA:GPU would copy a conditional's branch index to the host every layer and
  # step, so the GPU lowering keeps whole-cache attention: no 16-slot prefix of
  # the layer's keys appears in its program, while CPU and TPU slice one.
  q = jnp.zeros((2, 1, 4, 8))
  cache = jnp.zeros((3, 2, 80, 2, 8))
  mask = jnp.ones((2, 1, 80), bool)
  f = jax.jit(lambda q, ck, cv, m, live: models.cached_attention(q, ck, cv, jnp.int32(1), m, live))
  prefix = "tensor<2x16x2x8xf32>"                                 # keys[:, :16] of one layer
  for platform, sliced in (("cpu", True), ("tpu", True), ("cuda", False)):
    text = jax.export.export(f, platforms=[platform])(q, cache, cache, mask, jnp.int32(5))
    assert (prefix in text.mlir_module()) == sliced, platform


def test_bad_arguments_name_themselves():
  q = jnp.zeros((1, 4, 4, 8))
  kv = jnp.zeros((1, 4, 2, 8))
  with pytest.raises(ValueError, match="q_chunk"):
    models.attention(q, kv, kv, jnp.ones((1, 4, 4), bool), q_chunk=-1)
  with pytest.raises(ValueError, match="mask"):
    models.attention(q, kv, kv, jnp.ones((1, 4, 5), bool))
  with pytest.raises(ValueError, match="attention_chunk"):
    models.ModelConfig(model_type="llama", vocab_size=8, hidden_size=8, num_layers=1,
                       num_heads=2, intermediate_size=8, attention_chunk=-1)
  with pytest.raises(C.ConfigError, match="model.attention_chunk"):
    C.from_dict({"model": {"arch": {}, "attention_chunk": -2}, "data": {"task": "arithmetic"}})


def test_run_config_sets_the_model_chunk(qwen2, tmp_path):
  from jaxent.apps import _dryrun
  from jaxent.train import _build
  arch = {"model_type": "llama", "hidden_size": 16, "num_layers": 1, "num_heads": 2,
          "intermediate_size": 16}
  cfg = C.from_dict({"model": {"arch": arch, "attention_chunk": 64}, "data": {"task": "arithmetic"}})
  assert _build.load_policy(cfg, weights=False)[0].config.attention_chunk == 64
  tm = qwen2[0]
  (tmp_path / "config.json").write_text(tm.config.to_json_string())
  cfg = C.from_dict({"model": {"path": str(tmp_path), "attention_chunk": 0},
                     "data": {"train_path": "x.jsonl"}})
  assert _dryrun.model_config(cfg).attention_chunk == 0
  assert C.from_dict({"model": {"arch": arch}, "data": {"task": "arithmetic"}}).model.attention_chunk \
      == models.ModelConfig(**arch, vocab_size=8).attention_chunk   # one default


# ----------------------------------------------------------------------------- whole model
@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
  """(torch model, jaxent Model with chunked attention) on the same tiny checkpoint."""
  tm = make_torch_model(FAMILIES["qwen2"](), seed=3)
  path = tmp_path_factory.mktemp("qwen2")
  tm.save_pretrained(path)
  m = models.from_pretrained(path)
  return tm, m.replace(config=m.config.replace(attention_chunk=4))


def _left_padded(t=12, lengths=(12, 9, 5)):
  tokens = np.random.RandomState(5).randint(0, 160, (len(lengths), t)).astype(np.int32)
  mask = (np.arange(t)[None, :] >= t - np.array(lengths)[:, None]).astype(np.int32)
  return tokens * mask, mask


def test_model_logits_and_cached_prefill_match_transformers(qwen2):
  tm, m = qwen2
  cfg = m.config
  tokens, mask = _left_padded()
  pos = models.default_positions(jnp.asarray(tokens), jnp.asarray(mask))
  ref = torch_logits(tm, tokens, attention_mask=mask, position_ids=np.array(pos))
  real = mask.astype(bool)
  apply = jax.jit(models.apply, static_argnums=0)
  logits, _ = apply(cfg, m.params, tokens, pos, attention_mask=mask)
  np.testing.assert_allclose(np.asarray(logits)[real], ref[real], rtol=1e-4, atol=2e-5)
  # Prefill into a cache of 16 slots (the sampler's path): queries chunked against S = 16.
  kv_mask = np.concatenate([real, np.ones((B, 4), bool)], axis=1)
  logits, cache = apply(cfg, m.params, tokens, pos, cache=models.init_cache(cfg, B, 16),
                        kv_mask=kv_mask)
  np.testing.assert_allclose(np.asarray(logits)[real], ref[real], rtol=1e-4, atol=2e-5)
  assert int(cache.index) == 12
  # The chunked path is the one taken (a scan over chunks inside the scan over layers).
  scans = lambda c: str(jax.make_jaxpr(  # noqa: E731
      lambda p: models.apply(c, p, tokens, pos, attention_mask=mask))(m.params)).count("scan[")
  assert scans(cfg) > scans(cfg.replace(attention_chunk=0))


def test_chunked_forward_on_a_mesh_matches_transformers(qwen2):
  # Chunks of queries under GSPMD: batch over data x fsdp, heads over tensor.
  tm, m = qwen2
  cfg = m.config
  tokens, mask = _left_padded(lengths=(12, 9, 5, 1))
  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
  params = jax.device_put(m.params, models.param_shardings(cfg, mesh))
  rows = sharding.named_sharding(mesh, ("batch", "seq"))
  with jax.set_mesh(mesh):
    logits, _ = jax.jit(models.apply, static_argnums=0)(
        cfg, params, jax.device_put(tokens, rows), attention_mask=jax.device_put(mask, rows))
  pos = np.array(models.default_positions(jnp.asarray(tokens), jnp.asarray(mask)))
  ref = torch_logits(tm, tokens, attention_mask=mask, position_ids=pos)
  real = mask.astype(bool)
  np.testing.assert_allclose(np.asarray(logits)[real], ref[real], rtol=1e-4, atol=2e-5)


def test_param_gradients_chunked_under_remat_match_torch_autograd(qwen2, tmp_path):
  # Gradients of the chunked attention nested in the layer's jax.checkpoint, against
  # torch autograd mapped to our layout by writing them as a checkpoint and loading it.
  tm, m = qwen2
  tokens, mask = _left_padded()
  assert_remat_grads_match_torch(tm, m, tokens, mask, tmp_path)


def test_sampler_greedy_with_chunked_prefill_matches_transformers(qwen2):
  tm, m = qwen2
  prompts = [[3, 17, 42], [5, 9, 11, 60, 2, 7, 81], [90, 1, 33, 4, 4, 58, 12, 70, 29, 15, 6]]
  r = 6
  out = sampler.generate(m, prompts, max_new_tokens=r, temperature=0.0, key=jax.random.key(0))
  hf = []
  for p in prompts:
    with torch.no_grad():
      seq = tm.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                        max_new_tokens=r, do_sample=False, eos_token_id=None, pad_token_id=0)
    hf.append(seq[0, len(p):].tolist())
  np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(hf))
  # The prompt bucket (the prefill's T) exceeds the chunk, so the prefill was chunked.
  assert sampler.Sampler(m.config).prompt_bucket(11) > m.config.attention_chunk


# ----------------------------------------------------------------------------- memory
def test_compiled_forward_backward_holds_no_full_score_buffer():
  """Forward + backward of a 1-layer model over T = 256 tokens under remat: with chunks
  of 16 queries no float32 buffer has T x T elements (a chunk's scores have H x 16 x T;
  the whole path's H x T x T), and XLA's temp memory is below one [H, T, T] float32
  buffer (the whole path needs four: scores, probabilities and their cotangents)."""
  t, h = 256, 8
  cfg = models.ModelConfig(model_type="llama", vocab_size=64, hidden_size=32, num_layers=1,
                           num_heads=h, num_kv_heads=2, intermediate_size=64, remat=True)
  params = models.param_shapes(cfg)
  tokens = jax.ShapeDtypeStruct((1, t), jnp.int32)

  def compiled(chunk):
    c = cfg.replace(attention_chunk=chunk)
    def loss(p, x):
      return jnp.sum(jax.nn.log_softmax(models.apply(c, p, x)[0])[..., 0])
    return jax.jit(jax.grad(loss)).lower(params, tokens).compile()

  def largest_f32(exe):
    sizes = [np.prod([int(d) for d in dims.split(",") if d] or [1])
             for dims in re.findall(r"f32\[([\d,]*)\]", exe.as_text())]
    return max(sizes)

  whole, chunked = compiled(0), compiled(16)
  scores = h * t * t
  assert largest_f32(whole) >= scores                  # the check can see a full buffer
  assert largest_f32(chunked) < t * t
  assert whole.memory_analysis().temp_size_in_bytes >= 3 * 4 * scores
  assert chunked.memory_analysis().temp_size_in_bytes < 4 * scores
