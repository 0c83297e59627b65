"""Benchmark: jitted value-and-grad of each policy loss, as a ratio to PPO-clip.

Run: ``.venv/bin/python bench/losses.py [--batch 256 --time 4096 --reps 20]``.

Each loss is differentiated with respect to ``log_prob`` on ``batch × time``
tokens (a quarter of them padding on average), with the paper's ratio 2e-4.
After one warm-up (compile) call each, the functions run in rounds, in the
same process: each round visits every function once, in a shuffled order.
Two cache regimes (``--cache``): ``warm`` times ``--inner`` back-to-back calls
after one untimed call, so each function runs with its own inputs in cache
whatever ran before it; ``cold`` flushes the caches before each single call,
as in training, where the loss follows a forward pass. A ratio is the median
over rounds of (time / the same round's PPO-clip time), which keeps it
meaningful on a shared, noisy CPU. Each line also gives the ratio of best times (fastest
call of the function over fastest ``ppo_clip`` call): other jobs on a shared
machine only ever add time, so the minimum is the least disturbed estimate.
"""
from __future__ import annotations

import argparse
import contextlib
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


# Holds the mesh set by --mesh for the whole run.
_MESH_CONTEXT = contextlib.ExitStack()

# Larger than twice the last-level cache of the machines this runs on (32 MiB).
_FLUSH_BYTES = 64 << 20


def _inputs(batch: int, length: int, seed: int = 0):
  k = jax.random.split(jax.random.key(seed), 5)
  lp = -jax.random.exponential(k[0], (batch, length)) * 1.5
  old = lp + 0.05 * jax.random.normal(k[1], (batch, length))
  adv = jnp.repeat(jax.random.normal(k[2], (batch, 1)), length, axis=1)
  lens = jax.random.randint(k[3], (batch, 1), length // 2, length + 1)
  mask = jnp.arange(length)[None] < lens
  return lp, old, adv, mask, k[4]


def _score_block_max(lp, adv, mask, mean_a, mean_lp):
  cov = jnp.where(mask, (adv - mean_a) * (lp - mean_lp), -jnp.inf)
  return jnp.max(cov.reshape(-1, 64), axis=1)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--batch", type=int, default=256)
  p.add_argument("--time", type=int, default=4096)
  p.add_argument("--reps", type=int, default=20)
  p.add_argument("--inner", type=int, default=5, help="back-to-back calls per warm timing")
  p.add_argument("--cache", choices=("warm", "cold", "both"), default="both")
  p.add_argument("--ratio", type=float, default=2e-4)
  p.add_argument("--breakdown", choices=("all", "entropy", "none"), default="all",
                 help="which breakdown rows to time after the losses")
  p.add_argument("--mesh", default=None,
                 help="data,fsdp,tensor sizes, e.g. 8,1,1: shard the batch over a CPU mesh "
                      "(set XLA_FLAGS=--xla_force_host_platform_device_count=N)")
  args = p.parse_args()
  lp, old, adv, mask, key = _inputs(args.batch, args.time)
  if args.mesh:
    from jax.sharding import NamedSharding, PartitionSpec as P

    from jaxent.sharding import make_mesh
    mesh = make_mesh(*(int(x) for x in args.mesh.split(",")))
    _MESH_CONTEXT.enter_context(jax.set_mesh(mesh))
    sh = NamedSharding(mesh, P(("data", "fsdp")))
    lp, old, adv, mask = (jax.device_put(x, sh) for x in (lp, old, adv, mask))
  r = args.ratio

  def vg(loss_fn):
    return jax.jit(jax.value_and_grad(lambda lp, *a: loss_fn(lp, *a)[0]))

  fns = {
      "ppo_clip": vg(lambda lp, old, adv, mask, key: losses.ppo_clip(lp, old, adv, mask)),
      "clip_cov": vg(lambda lp, old, adv, mask, key: losses.clip_cov(
          lp, old, adv, mask, key=key, ratio=r)),
      "kl_cov": vg(lambda lp, old, adv, mask, key: losses.kl_cov(lp, old, adv, mask, ratio=r)),
      "gspo": vg(lambda lp, old, adv, mask, key: losses.gspo(lp, old, adv, mask)),
      "cispo": vg(lambda lp, old, adv, mask, key: losses.cispo(lp, old, adv, mask)),
      "gmpo": vg(lambda lp, old, adv, mask, key: losses.gmpo(lp, old, adv, mask)),
      # The 80/20 recipe: the entropy mask (entropy stand-in: −log π) as the
      # weights of PPO-clip, selection included.
      "ppo_clip + top_entropy": vg(lambda lp, old, adv, mask, key: losses.ppo_clip(
          lp, old, adv, mask, weights=losses.top_entropy_mask(
              -lax.stop_gradient(lp), mask, quantile=0.2).astype(lp.dtype))),
      "ppo_clip + rollout_corr": vg(lambda lp, old, adv, mask, key: losses.ppo_clip(
          lp, old, adv, mask, weights=losses.rollout_correction(
              old, lp - 0.01, mask, threshold=2.0)[0])),
  }
  k_max = ops.static_count_bound(r, lp.size)
  sel = losses.select_kl_cov(lp, adv, mask, ratio=r)
  # Where the time goes: the selections alone, the losses with a precomputed
  # selection, Clip-Cov's hashed ranking values (and, for comparison, the
  # threefry uniforms it used to draw), and the exact top-k: block-pruned as
  # ops.top_k_mask does it, and one flat lax.top_k.
  parts = {
      "top_entropy_mask": (jax.jit(functools.partial(losses.top_entropy_mask, quantile=0.2)),
                           (-lp, mask)),
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
      # A floor for any exact selection under XLA:CPU's fusion rules: the two
      # global means (two reductions of x·m, the float mask given) and one
      # pass writing a per-token score that a block reduction reads. No
      # top-k, no mask, no candidates; the loss given a selection comes on top.
      "floor: two masked sums": (jax.jit(lambda adv, lp, m: (jnp.sum(adv * m), jnp.sum(lp * m))),
                                 (adv, lp, mask.astype(jnp.float32))),
      "floor: score + block max": (jax.jit(_score_block_max), (lp, adv, mask, jnp.float32(0.1),
                                                               jnp.float32(-1.5))),
  }
  print(f"backend={jax.default_backend()} devices={jax.device_count()} mesh={args.mesh} "
        f"tokens={args.batch}x{args.time} ratio={r} k_max={k_max}")
  # The CPU is shared: time the candidates interleaved with the baseline,
  # round by round, and report the median of the per-round ratios.
  cases = {name: (fn, (lp, old, adv, mask, key)) for name, fn in fns.items()}
  if args.breakdown == "entropy":
    parts = {"top_entropy_mask": parts["top_entropy_mask"]}
  if args.breakdown != "none":
    cases.update(parts)
  for fn, fargs in cases.values():
    jax.block_until_ready(fn(*fargs))  # compile + warm-up
  for cache in ("warm", "cold") if args.cache == "both" else (args.cache,):
    _report(cases, _time_rounds(cases, args.reps, args.inner, cache), cache)


def _time_rounds(cases, reps: int, inner: int, cache: str) -> dict[str, list[float]]:
  """Per-call seconds of each case, ``reps`` rounds in a shuffled order.

  ``warm``: one untimed call, then ``inner`` back-to-back calls timed together,
  so each function runs with its own inputs and buffers in cache, whatever
  ran before it. ``cold``: the caches are flushed (a write over twice the
  last-level cache) before each single timed call, as when a loss follows a
  model's forward pass that streamed other data through the cache.
  """
  times = {name: [] for name in cases}
  order = np.random.default_rng(0)
  flush = np.zeros(_FLUSH_BYTES // 8)
  for _ in range(reps):
    for name in order.permutation(list(cases)):
      fn, fargs = cases[name]
      if cache == "warm":
        jax.block_until_ready(fn(*fargs))
        n = inner
      else:
        flush += 1.0
        n = 1
      t0 = time.perf_counter()
      for _ in range(n):
        out = fn(*fargs)
      jax.block_until_ready(out)
      times[name].append((time.perf_counter() - t0) / n)
  return times


def _report(cases, times, cache: str) -> None:
  print(f"cache: {cache}")
  base = times["ppo_clip"]
  for name in cases:
    if name == "top_entropy_mask":
      print("  breakdown:")
    ratios = [t / b for t, b in zip(times[name], base)]
    print(f"{name:>24s}  {statistics.median(times[name]) * 1e3:8.2f} ms  "
          f"{statistics.median(ratios):5.2f}x ppo_clip (IQR {np.percentile(ratios, 25):.2f}-"
          f"{np.percentile(ratios, 75):.2f}); best {min(times[name]) * 1e3:6.2f} ms, "
          f"{min(times[name]) / min(base):5.2f}x the best ppo_clip")


if __name__ == "__main__":
  main()
