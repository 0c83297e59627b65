"""`jaxent eval` batching: one compiled shape per benchmark vs the sampler's per-call buckets.

``evaluate_benchmark`` counts its batch in rows (prompts x samples) and pads
every call to one prompt bucket (the benchmark's longest prompt) and one
prompt count, so the ragged last call and calls with shorter prompts reuse
the compiled prefill and decode. The baseline is the same row budget with
the sampler's default buckets (powers of two of each call's longest prompt
and prompt count), in the same process, after ``jax.clear_caches()``.

Generation only (no grading): a random Qwen2-shaped model, prompts of
random lengths, mean@k sampling at T = 0.6, no EOS.

  python bench/eval_batching.py                      # 13 prompts, k=8, 32 rows a call
  python bench/eval_batching.py --prompts 30 --k 32 --rows 64
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--prompts", type=int, default=13)
  ap.add_argument("--k", type=int, default=8)
  ap.add_argument("--rows", type=int, default=32, help="rows (prompts x samples) per call")
  ap.add_argument("--new-tokens", type=int, default=32)
  ap.add_argument("--min-len", type=int, default=8)
  ap.add_argument("--max-len", type=int, default=120)
  args = ap.parse_args()

  import jax
  import numpy as np

  from jaxent import models, sampler
  from jaxent import eval as eval_lib

  cfg = models.ModelConfig(model_type="qwen2", vocab_size=2048, hidden_size=256, num_layers=4,
                           num_heads=4, num_kv_heads=2, intermediate_size=512,
                           tie_word_embeddings=True)
  model = models.init_model(cfg, seed=0)
  rng = np.random.default_rng(0)
  prompts = [rng.integers(2, cfg.vocab_size, size=int(n)).tolist()
             for n in rng.integers(args.min_len, args.max_len + 1, size=args.prompts)]
  per_call = eval_lib.samples_per_call(args.k, args.rows)
  ppc = min(len(prompts), max(1, args.rows // per_call))
  p_bucket = sampler.Sampler(cfg).prompt_bucket(max(map(len, prompts)))
  key = jax.random.PRNGKey(0)

  def run(fixed: bool) -> tuple[float, int, int]:
    jax.clear_caches()
    before = dict(sampler.TRACE_COUNTS)
    t0 = time.perf_counter()
    for i in range(0, len(prompts), ppc):
      for rep in range(args.k // per_call):
        kw = dict(prompt_buckets=(p_bucket,), batch_buckets=(ppc,)) if fixed else {}
        out = sampler.generate(model, prompts[i:i + ppc], max_new_tokens=args.new_tokens,
                               temperature=0.6, num_samples=per_call,
                               key=jax.random.fold_in(jax.random.fold_in(key, i), rep), **kw)
        jax.block_until_ready(out.tokens)
    dt = time.perf_counter() - t0
    return (dt, sampler.TRACE_COUNTS["prefill"] - before.get("prefill", 0),
            sampler.TRACE_COUNTS["decode"] - before.get("decode", 0))

  base = run(fixed=False)
  new = run(fixed=True)
  calls = -(-len(prompts) // ppc) * (args.k // per_call)
  print(f"{len(prompts)} prompts of {args.min_len}-{args.max_len} tokens, k={args.k}, "
        f"{args.rows} rows a call ({ppc} prompts x {per_call} samples, {calls} calls), "
        f"{args.new_tokens} new tokens; jax {jax.__version__}, {jax.devices()[0].platform}")
  print(f"  per-call buckets (baseline): {base[0]:.2f} s, prefill/decode traces {base[1]}/{base[2]}")
  print(f"  one shape per benchmark:     {new[0]:.2f} s, prefill/decode traces {new[1]}/{new[2]}")
  print(f"  speedup {base[0] / new[0]:.2f}x")
  print(f"  rows a call with the old prompt-count batch (--batch-size {args.rows} prompts): "
        f"{args.rows * args.k} (now {ppc * per_call})")


if __name__ == "__main__":
  main()
