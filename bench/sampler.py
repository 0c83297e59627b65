"""Generated tokens/s of jaxent.sampler vs transformers ``generate`` (same weights, same process).

Model: a random SmolLM2-135M-shaped Llama (hidden 576, 30 layers, 9 heads,
3 kv heads, intermediate 1536, vocab 49152, tied embeddings), built in torch,
saved with ``save_pretrained`` and loaded with ``jaxent.models.from_pretrained``.
Both sides sample with temperature 1, no top-k/top-p, no EOS (every row
generates exactly ``--new-tokens``), from the same prompts.

Also reports decode tokens/s against the memory-bandwidth limit: per decode
step the device reads every parameter and the whole KV cache once, so
``limit = B / ((param_bytes + kv_cache_bytes) / bandwidth)`` with the
bandwidth measured by a large on-device copy. That is the figure that
matters on a GPU/TPU; on CPU it is printed for completeness.

  python bench/sampler.py                # batch 8 and 64, 64 new tokens, 1 core each
  python bench/sampler.py --threads 2    # both cores for both libraries
  python bench/sampler.py --batches 8 --skip-hf
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _threads  # noqa: E402  (pins the process before jax and torch start)

THREADS = _threads.pin(sys.argv)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxent import models, sampler  # noqa: E402
from jaxent.sampler import _sampler as _impl  # noqa: E402  (prefill/decode timed apart)

SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                    num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                    max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=True,
                    rope_parameters={"rope_type": "default", "rope_theta": 1e5},
                    bos_token_id=None, eos_token_id=None, pad_token_id=None)


def build_models(seed: int = 0):
  """The torch model and the jaxent Model with the same weights."""
  import torch
  import transformers

  torch.set_num_threads(THREADS)
  torch.manual_seed(seed)
  cfg = transformers.LlamaConfig(**SMOLLM2_135M)
  tm = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
  with tempfile.TemporaryDirectory() as d:
    tm.save_pretrained(d)
    jm = models.from_pretrained(d)
  return tm, jm


def _timed(fn, repeats: int = 1) -> float:
  """Best wall time of ``repeats`` calls (each call must block until done)."""
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - t0)
  return best


def jaxent_runner(model, prompts, new_tokens: int):
  """A no-argument callable running one generate call to completion (compiled here)."""
  kw = dict(max_new_tokens=new_tokens, temperature=1.0, top_p=1.0, top_k=0)
  seeds = iter(range(10**6))

  def run():
    out = sampler.generate(model, prompts, key=jax.random.key(next(seeds)), **kw)
    out.tokens.block_until_ready()

  run()  # compile
  return run


def hf_runner(tm, prompts, new_tokens: int):
  """The same for transformers ``generate`` (sampling, no top-k/top-p, no EOS)."""
  import torch

  ids = torch.tensor(prompts)
  am = torch.ones_like(ids)
  kw = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, eos_token_id=None,
            pad_token_id=0)

  def run(n=new_tokens):
    with torch.no_grad():
      out = tm.generate(ids, attention_mask=am, max_new_tokens=n, min_new_tokens=n, **kw)
    assert out.shape == (len(prompts), ids.shape[1] + n), out.shape

  run(2)  # warm-up
  return run


def measured_bandwidth(nbytes: int = 1 << 28) -> float:
  """Device memory bandwidth (bytes/s) from a large on-device copy (read + write)."""
  x = jnp.ones((nbytes // 4,), jnp.float32)
  f = jax.jit(lambda x: x + 1.0)
  f(x).block_until_ready()
  dt = _timed(lambda: f(x).block_until_ready(), repeats=5)
  return 2 * nbytes / dt


def decode_vs_bandwidth(model, batch: int, prompt_len: int = 32, new_tokens: int = 64) -> dict:
  """Decode tokens/s vs the limit ``B / ((param + KV cache bytes) / bandwidth)``.

  The decode time is the decode loop alone (prefill timed apart), over
  ``new_tokens - 1`` steps. Run after ``jaxent_runner`` with the same shapes,
  it reuses the compiled prefill and decode.
  """
  cfg, params = model.config, model.params
  smp = _impl.Sampler(cfg)
  p = smp.prompt_bucket(prompt_len)
  bb = smp.batch_bucket(batch)
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (bb, p)), jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (bb, p))
  pmask = jnp.ones((bb, p), bool)
  live = jnp.ones((bb,), bool)
  knobs = _impl._check_knobs(1.0, 1.0, 0, None, 0, cfg.vocab_size)

  def prefill(seed):
    return _impl._prefill(smp, params, tokens, positions, pmask, live, knobs,
                          jax.random.key(seed), num_samples=1, max_new_tokens=new_tokens)

  def run(seed):
    state, kv_mask = prefill(seed)
    jax.block_until_ready(state)
    t0 = time.perf_counter()
    out = _impl._decode(smp, params, state, kv_mask, knobs)
    out.tokens.block_until_ready()
    return time.perf_counter() - t0, out

  dt, out = run(1)  # same shapes as generate's programs: already compiled
  steps = int(out.step) - 1
  param_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
  cache = out.cache
  cache_bytes = cache.k.size * cache.k.dtype.itemsize + cache.v.size * cache.v.dtype.itemsize
  bw = measured_bandwidth()
  step_bytes = param_bytes + cache_bytes
  tok_s = bb * steps / dt
  limit = bb * bw / step_bytes
  return dict(device=str(jax.devices()[0].device_kind), batch=bb, steps=steps,
              decode_tok_s=tok_s, bandwidth_GBps=bw / 1e9, param_MB=param_bytes / 1e6,
              cache_MB=cache_bytes / 1e6, limit_tok_s=limit, fraction=tok_s / limit)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--batches", type=int, nargs="+", default=[8, 64])
  ap.add_argument("--new-tokens", type=int, default=64)
  ap.add_argument("--prompt-len", type=int, default=16)
  ap.add_argument("--repeats", type=int, default=2, help="alternating timed runs per side")
  ap.add_argument("--skip-hf", action="store_true")
  ap.add_argument("--skip-bandwidth", action="store_true")
  ap.add_argument("--threads", type=int, default=1,
                  help="CPU cores (and torch threads) for both sides; read before jax starts")
  args = ap.parse_args(argv)

  t0 = time.perf_counter()
  tm, jm = build_models()
  print(f"model: SmolLM2-135M shape, {jm.num_params / 1e6:.1f}M params, float32; "
        f"device {jax.devices()[0].device_kind}, {THREADS} core(s) for both; setup {time.perf_counter() - t0:.1f}s")
  rng = np.random.default_rng(0)
  for b in args.batches:
    prompts = rng.integers(0, jm.config.vocab_size, (b, args.prompt_len)).tolist()
    n = b * args.new_tokens
    runners = {"jaxent": jaxent_runner(jm, prompts, args.new_tokens)}
    if not args.skip_hf:
      runners["transformers"] = hf_runner(tm, prompts, args.new_tokens)
    # Alternate the two and keep each one's best time: the CPU is shared and
    # its load drifts, which would otherwise bias whichever ran second.
    best = {k: float("inf") for k in runners}
    for _ in range(args.repeats):
      for k, run in runners.items():
        best[k] = min(best[k], _timed(run))
    line = " | ".join(f"{k} {n / t:7.1f} tok/s ({t:.2f}s)" for k, t in best.items())
    if "transformers" in best:
      line += f" | ratio {best['transformers'] / best['jaxent']:.2f}x"
    print(f"batch {b:3d}: {line}", flush=True)
  if not args.skip_bandwidth:
    for b in args.batches:
      r = decode_vs_bandwidth(jm, b, args.prompt_len, args.new_tokens)
      print(f"decode batch {r['batch']:3d} on {r['device']}: {r['decode_tok_s']:.1f} tok/s over "
            f"{r['steps']} steps; bandwidth {r['bandwidth_GBps']:.1f} GB/s, params "
            f"{r['param_MB']:.0f} MB + KV cache {r['cache_MB']:.0f} MB per step -> limit "
            f"{r['limit_tok_s']:.1f} tok/s; {100 * r['fraction']:.0f}% of the limit", flush=True)
  print(f"total {time.perf_counter() - t0:.1f}s")


if __name__ == "__main__":
  main()
