"""Generated tokens/s of the vLLM rollout engine vs jaxent's static and continuous engines.

Same process, same weights (a random jaxent model), same prompts, back to
back: every engine generates ``B`` rows of exactly ``--new-tokens`` tokens
(temperature 1, no top-k/top-p, no EOS) through the rollout ``Engine``
Protocol; each is called once untimed (compiles; vLLM's start-up and first
forward) and then timed, best of ``--repeats``. Also times one weight sync
of the vLLM engine (``VLLMEngine.sync``: HF export, tensors in the engine's
dtype, ``reload_weights``, prefix-cache reset).

Needs the vllm package (docs/VLLM.md: its own venv):

  /work/venvs/vllm/bin/python bench/vllm_engine.py                     # 135M shape, B = 8, 64
  /work/venvs/vllm/bin/python bench/vllm_engine.py --model small --new-tokens 64
  /work/venvs/vllm/bin/python bench/vllm_engine.py --vllm-dtype bfloat16
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _threads  # noqa: E402  (pins the process before jax and torch start)

THREADS = _threads.pin(sys.argv)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from jaxent import models, rollout  # noqa: E402

SHAPES = {
    # SmolLM2-135M (Llama, tied embeddings), head_dim 64
    "135m": dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                 num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64,
                 tie_word_embeddings=True, rope_theta=1e5, max_position_embeddings=2048),
    # 12.6M, as bench/rollout_engine.py's default
    "small": dict(model_type="llama", vocab_size=8192, hidden_size=384, intermediate_size=1024,
                  num_layers=6, num_heads=6, num_kv_heads=2, head_dim=64,
                  tie_word_embeddings=True, rope_theta=1e5, max_position_embeddings=2048),
}


def _block(out):
  jax.block_until_ready(out.tokens)
  return out


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--model", choices=sorted(SHAPES), default="135m")
  ap.add_argument("--batches", type=int, nargs="+", default=[8, 64])
  ap.add_argument("--new-tokens", type=int, default=32)
  ap.add_argument("--prompt-len", type=int, default=16)
  ap.add_argument("--repeats", type=int, default=1)
  ap.add_argument("--threads", type=int, default=1)
  ap.add_argument("--vllm-dtype", choices=("float32", "bfloat16"), default="float32")
  ap.add_argument("--engines", nargs="+", default=["static", "continuous", "vllm"])
  args = ap.parse_args()

  cfg = models.ModelConfig(**SHAPES[args.model], dtype="float32", param_dtype="float32")
  model = models.init_model(cfg, seed=0)
  n_params = sum(x.size for x in jax.tree.leaves(model.params))
  import torch
  import vllm
  print(f"model: {args.model} ({n_params / 1e6:.1f}M params), {args.new_tokens} new tokens, "
        f"prompt {args.prompt_len} tokens, {THREADS} threads; jax {jax.__version__}, "
        f"vllm {vllm.__version__}, torch {torch.__version__}, vllm dtype {args.vllm_dtype}")
  rng = np.random.default_rng(0)
  dec = rollout.Decoding(args.new_tokens, temperature=1.0)
  engines = {"static": rollout.make_engine("static"),
             "continuous": rollout.make_engine("continuous"),
             "vllm": rollout.make_engine("vllm", vllm_dtype=args.vllm_dtype,
                                         vllm_kv_cache_bytes=2 << 30, vllm_max_model_len=512)}
  for b in args.batches:
    prompts = [list(rng.integers(1, cfg.vocab_size, size=args.prompt_len)) for _ in range(b)]
    for name in args.engines:
      eng = engines[name]
      kw = dict(num_samples=1, key=jax.random.key(0))
      t0 = time.perf_counter()
      _block(eng.generate(model, prompts, dec, **kw))           # compile / start-up
      first = time.perf_counter() - t0
      best = float("inf")
      for r in range(args.repeats):
        t0 = time.perf_counter()
        out = _block(eng.generate(model, prompts, dec, num_samples=1, key=jax.random.key(r + 1)))
        best = min(best, time.perf_counter() - t0)
      toks = int(np.asarray(out.mask).sum())
      print(f"B={b:3d} {name:>10}: {best:7.2f} s  {toks / best:8.1f} tok/s  "
            f"(first call {first:.1f} s, {toks} tokens)", flush=True)
  if "vllm" in args.engines:
    eng = engines["vllm"]
    new = models.Model(params=jax.tree.map(lambda x: x * 1.01, model.params), config=cfg)
    times = [eng.sync(new if i % 2 == 0 else model) for i in range(3)]
    print(f"vllm weight sync ({n_params / 1e6:.1f}M params, {args.vllm_dtype}): "
          f"{', '.join(f'{t:.2f}' for t in times)} s", flush=True)
    eng.close()


if __name__ == "__main__":
  main()
