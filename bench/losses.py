"""Benchmark: jitted value-and-grad of each policy loss, as a ratio to PPO-clip.

Run: ``.venv/bin/python bench/losses.py [--batch 256 --time 4096 --reps 20]``.

Each loss is differentiated with respect to ``log_prob`` on ``batch × time``
tokens (a quarter of them padding on average), with the paper's ratio 2e-4.
After one warm-up (compile) call each, the functions run in rounds, one call
of each per round, in the same process; a ratio is the median over rounds of
(time / the same round's PPO-clip time), which keeps it meaningful on a
shared, noisy CPU.
"""
from __future__ import annotations

import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxent import losses, ops
from jaxent.losses._covariance import token_uniforms
from jaxent.ops._select import _top_k_exact


def _inputs(batch: int, length: int, seed: int = 0):
  k = jax.random.split(jax.random.key(seed), 5)
  lp = -jax.random.exponential(k[0], (batch, length)) * 1.5
  old = lp + 0.05 * jax.random.normal(k[1], (batch, length))
  adv = jnp.repeat(jax.random.normal(k[2], (batch, 1)), length, axis=1)
  lens = jax.random.randint(k[3], (batch, 1), length // 2, length + 1)
  mask = jnp.arange(length)[None] < lens
  return lp, old, adv, mask, k[4]


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--batch", type=int, default=256)
  p.add_argument("--time", type=int, default=4096)
  p.add_argument("--reps", type=int, default=20)
  p.add_argument("--ratio", type=float, default=2e-4)
  args = p.parse_args()
  lp, old, adv, mask, key = _inputs(args.batch, args.time)
  r = args.ratio

  def vg(loss_fn):
    return jax.jit(jax.value_and_grad(lambda lp, *a: loss_fn(lp, *a)[0]))

  fns = {
      "ppo_clip": vg(lambda lp, old, adv, mask, key: losses.ppo_clip(lp, old, adv, mask)),
      "clip_cov": vg(lambda lp, old, adv, mask, key: losses.clip_cov(
          lp, old, adv, mask, key=key, ratio=r)),
      "kl_cov": vg(lambda lp, old, adv, mask, key: losses.kl_cov(lp, old, adv, mask, ratio=r)),
  }
  k_max = ops.static_count_bound(r, lp.size)
  sel = losses.select_kl_cov(lp, adv, mask, ratio=r)
  # Where the time goes: the selections alone, the losses with a precomputed
  # selection, Clip-Cov's hashed ranking values (and, for comparison, the
  # threefry uniforms it used to draw), and the exact top-k: block-pruned as
  # ops.top_k_mask does it, and one flat lax.top_k.
  parts = {
      "select_kl_cov": (jax.jit(functools.partial(losses.select_kl_cov, ratio=r)),
                        (lp, adv, mask)),
      "select_clip_cov": (jax.jit(lambda lp, old, adv, mask, key: losses.select_clip_cov(
          lp, old, adv, mask, key=key, ratio=r, cov_lb=1.0, cov_ub=5.0, clip_low=0.2,
          clip_high=0.2)), (lp, old, adv, mask, key)),
      "kl_cov(selection=)": (vg(lambda lp, old, adv, mask, sel: losses.kl_cov(
          lp, old, adv, mask, selection=sel)), (lp, old, adv, mask, sel)),
      "clip_cov(selection=)": (vg(lambda lp, old, adv, mask, sel: losses.clip_cov(
          lp, old, adv, mask, selection=sel)), (lp, old, adv, mask, sel)),
      "token_uniforms (hash)": (jax.jit(lambda key: token_uniforms(key, lp.shape)), (key,)),
      "threefry uniform [B,T]": (jax.jit(lambda key: jax.random.uniform(key, lp.shape)), (key,)),
      f"block top-k (k={k_max})": (jax.jit(lambda x: _top_k_exact(x.reshape(-1), k_max)), (lp,)),
      f"lax.top_k (k={k_max})": (jax.jit(lambda x: lax.top_k(x.reshape(-1), k_max)), (lp,)),
  }
  print(f"backend={jax.default_backend()} devices={jax.device_count()} "
        f"tokens={args.batch}x{args.time} ratio={r} k_max={k_max}")
  # The CPU is shared: time the candidates interleaved with the baseline,
  # round by round, and report the median of the per-round ratios.
  cases = {name: (fn, (lp, old, adv, mask, key)) for name, fn in fns.items()}
  cases.update(parts)
  for fn, fargs in cases.values():
    jax.block_until_ready(fn(*fargs))  # compile + warm-up
  times = {name: [] for name in cases}
  for _ in range(args.reps):
    for name, (fn, fargs) in cases.items():
      t0 = time.perf_counter()
      jax.block_until_ready(fn(*fargs))
      times[name].append(time.perf_counter() - t0)
  base = times["ppo_clip"]
  for name in cases:
    if name == "select_kl_cov":
      print("  breakdown:")
    ratios = [t / b for t, b in zip(times[name], base)]
    print(f"{name:>24s}  {statistics.median(times[name]) * 1e3:8.2f} ms  "
          f"{statistics.median(ratios):5.2f}x ppo_clip (IQR {np.percentile(ratios, 25):.2f}-"
          f"{np.percentile(ratios, 75):.2f})")


if __name__ == "__main__":
  main()
