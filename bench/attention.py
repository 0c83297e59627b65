"""Whole vs query-chunked attention: forward+backward time and XLA's temp memory (CPU).

One attention call of ``models.attention`` (GQA, causal mask with left
padding) with the gradient of a random projection of its output w.r.t.
q, k and v, jitted. For each sequence length T it compiles the whole
attention (``q_chunk=0``, the baseline, in the same process) and each chunk
size, reports XLA's compiled ``memory_analysis().temp_size_in_bytes`` (the
scratch a call needs beside its arguments and outputs) and the median
wall time of the repeats (taken round-robin over the variants), and the
ratios chunked / whole.

Defaults: Qwen2.5-7B's per-layer attention shape scaled down to fit a laptop
(batch 1, 8 query heads / 2 kv heads, head_dim 64); float32.

  .venv/bin/python bench/attention.py [--seqs 2048 4096] [--chunks 512 1024] [--repeats 3]
"""
from __future__ import annotations

import argparse
import statistics
import time


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--seqs", type=int, nargs="+", default=[2048, 4096])
  ap.add_argument("--chunks", type=int, nargs="+", default=[512, 1024])
  ap.add_argument("--batch", type=int, default=1)
  ap.add_argument("--heads", type=int, default=8)
  ap.add_argument("--kv-heads", type=int, default=2)
  ap.add_argument("--head-dim", type=int, default=64)
  ap.add_argument("--repeats", type=int, default=3)
  args = ap.parse_args()

  import jax
  import jax.numpy as jnp
  import numpy as np

  from jaxent import models

  b, h, k, n = args.batch, args.heads, args.kv_heads, args.head_dim
  print(f"attention fwd+bwd, float32, B={b} H={h} K={k} N={n}, {jax.devices()[0].platform}")
  print(f"{'T':>6} {'q_chunk':>8} {'temp MB':>9} {'time ms':>9} {'mem ratio':>10} {'time ratio':>11}")
  for t in args.seqs:
    rng = np.random.RandomState(t)
    q = jnp.asarray(rng.randn(b, t, h, n), jnp.float32)
    kv = jnp.asarray(rng.randn(2, b, t, k, n), jnp.float32)
    ct = jnp.asarray(rng.randn(b, t, h, n), jnp.float32)
    lengths = rng.randint(t // 2, t + 1, b)
    valid = np.arange(t)[None, :] >= (t - lengths)[:, None]        # left padding
    mask = jnp.asarray(np.tril(np.ones((t, t), bool))[None] & valid[:, None, :])
    runs = {}
    for chunk in [0] + [c for c in args.chunks if c < t]:
      def loss(q, key, val, chunk=chunk):
        return jnp.sum(models.attention(q, key, val, mask, q_chunk=chunk) * ct)
      fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
      compiled = fn.lower(q, kv[0], kv[1]).compile()
      jax.block_until_ready(compiled(q, kv[0], kv[1]))            # warm-up
      runs[chunk] = (compiled, compiled.memory_analysis().temp_size_in_bytes, [])
    # Round-robin repeats: on a shared machine a load change hits every variant alike.
    for _ in range(args.repeats):
      for compiled, _, times in runs.values():
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(q, kv[0], kv[1]))
        times.append(time.perf_counter() - t0)
    base_temp, base_ms = runs[0][1], 1e3 * statistics.median(runs[0][2])
    for chunk, (_, temp, times) in runs.items():
      ms = 1e3 * statistics.median(times)
      print(f"{t:>6} {chunk or 'whole':>8} {temp / 1e6:>9.1f} {ms:>9.1f} "
            f"{temp / base_temp:>10.3f} {ms / base_ms:>11.2f}", flush=True)

if __name__ == "__main__":
  main()
