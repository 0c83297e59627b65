"""The matmul floor of one decode step: how fast can any CPU sampler of this model be?

Per decode step a sampler must multiply the batch's hidden states through every
weight matrix of the model: for the SmolLM2-135M shape of bench/sampler.py
(30 layers; q/o 576x576, k/v 576x192, gate/up 576x1536, down 1536x576; tied
head 576x49152) that is the whole step's arithmetic and weight traffic, minus
attention over a short KV cache, norms and sampling. This script times exactly
that chain of matmuls (float32, same shapes, one core, best of 10) in XLA
(`jax.jit`, a scanned layer) and in torch, in the same process. A sampler's
tokens/s can exceed ``B / floor`` only by doing less arithmetic per token.

Comparing with bench/sampler.py's whole-step figures bounds what is left:
``transformers step time / XLA floor`` is the largest speed-up over
transformers any XLA sampler of this model can reach on this machine.

  python bench/sampler_floor.py                 # batch 8 and 64, 1 core
  python bench/sampler_floor.py --threads 2
"""
from __future__ import annotations

import argparse
import os
import sys
import time


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--batches", type=int, nargs="+", default=[8, 64])
  p.add_argument("--threads", type=int, default=1)
  p.add_argument("--repeats", type=int, default=10)
  args = p.parse_args()
  if hasattr(os, "sched_setaffinity"):  # before jax/torch size their thread pools
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:args.threads])
  import jax
  import jax.numpy as jnp
  import numpy as np
  import torch

  torch.set_num_threads(args.threads)
  layers, d, f, v, kv = 30, 576, 1536, 49152, 192
  shapes = {"q": (d, d), "k": (d, kv), "v": (d, kv), "o": (d, d), "gate": (d, f), "up": (d, f),
            "down": (f, d)}
  rng = np.random.default_rng(0)
  w_np = {n: (0.02 * rng.standard_normal((layers,) + s)).astype(np.float32) for n, s in shapes.items()}
  head_np = (0.02 * rng.standard_normal((d, v))).astype(np.float32)
  n_params = sum(x.size for x in w_np.values()) + head_np.size

  w = {n: jnp.asarray(x) for n, x in w_np.items()}
  head = jnp.asarray(head_np)

  def layer(x, wl):
    q, k, vv = x @ wl["q"], x @ wl["k"], x @ wl["v"]
    x = x + (q + jnp.tile(k, d // kv) + jnp.tile(vv, d // kv)) @ wl["o"]
    h = jax.nn.silu(x @ wl["gate"]) * (x @ wl["up"])
    return x + h @ wl["down"]

  @jax.jit
  def xla_step(x, w, head):
    x, _ = jax.lax.scan(lambda x, wl: (layer(x, wl), None), x, w)
    return x @ head

  # The same chain over per-layer weight buffers (a Python loop, no stacked
  # arrays): XLA:CPU's matmul kernels cannot read a dynamic slice of a stacked
  # weight in place, so the scan copies each layer's weights every step; this
  # shows what those copies cost.
  w_layers = [{n: jnp.asarray(x[i]) for n, x in w_np.items()} for i in range(layers)]

  @jax.jit
  def xla_step_per_layer(x, w_layers, head):
    for wl in w_layers:
      x = layer(x, wl)
    return x @ head

  tw = {n: torch.from_numpy(x.copy()) for n, x in w_np.items()}
  th = torch.from_numpy(head_np.copy())

  def torch_step(x):
    for i in range(layers):
      q, k, vv = x @ tw["q"][i], x @ tw["k"][i], x @ tw["v"][i]
      x = x + (q + k.repeat(1, d // kv) + vv.repeat(1, d // kv)) @ tw["o"][i]
      h = torch.nn.functional.silu(x @ tw["gate"][i]) * (x @ tw["up"][i])
      x = x + h @ tw["down"][i]
    return x @ th

  def best(fn) -> float:
    fn()
    out = float("inf")
    for _ in range(args.repeats):
      t = time.perf_counter()
      fn()
      out = min(out, time.perf_counter() - t)
    return out

  print(f"{n_params / 1e6:.1f}M weights, float32, {args.threads} core(s), jax {jax.__version__}, "
        f"torch {torch.__version__}")
  for b in args.batches:
    x = jnp.ones((b, d), jnp.float32)
    tx = torch.ones(b, d)
    t_xla = best(lambda: jax.block_until_ready(xla_step(x, w, head)))
    t_layers = best(lambda: jax.block_until_ready(xla_step_per_layer(x, w_layers, head)))
    with torch.no_grad():
      t_torch = best(lambda: torch_step(tx))
    gf = 2 * n_params * b / 1e9
    print(f"batch {b:3d}: matmul floor per decode step  XLA {t_xla * 1e3:7.1f} ms "
          f"({b / t_xla:6.1f} tok/s, {gf / t_xla:5.1f} GFLOP/s) | torch {t_torch * 1e3:7.1f} ms "
          f"({b / t_torch:6.1f} tok/s, {gf / t_torch:5.1f} GFLOP/s) | XLA per-layer weights "
          f"{t_layers * 1e3:7.1f} ms ({b / t_layers:6.1f} tok/s)")
  sys.stdout.flush()


if __name__ == "__main__":
  main()
