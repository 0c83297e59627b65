"""Update-step throughput and the share of it spent in covariance selection.

For each model (the demo's tiny Qwen2 and a 135M-parameter Llama/SmolLM2
shape) and each loss, times the jitted, donated ``train_step`` on one
mini-batch, and, separately, the jitted selection (``select_kl_cov`` /
``select_clip_cov``) on arrays of the same [B, R] shape — the selection's
share of the update is their ratio. Baselines run in the same process.

  .venv/bin/python bench/train_step.py [--reps 5] [--skip-135m]
"""
from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxent import losses, models
from jaxent.config import LossConfig, OptimConfig
from jaxent.train import _step as S
from jaxent.types import Batch

MODELS = {
    "demo-0.12M": (models.ModelConfig(model_type="qwen2", vocab_size=15, hidden_size=64, num_layers=2,
                                      num_heads=4, num_kv_heads=2, head_dim=16, intermediate_size=256,
                                      tie_word_embeddings=True), 64, 12, 12),
    "llama-135M": (models.ModelConfig(model_type="llama", vocab_size=49152, hidden_size=576,
                                      num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64,
                                      intermediate_size=1536, tie_word_embeddings=True), 2, 64, 192),
}
LOSSES = {
    "ppo_clip": LossConfig(name="ppo_clip"),
    "clip_cov": LossConfig(name="clip_cov", ratio=2e-3, cov_lb=-1e9, cov_ub=1e9),
    "kl_cov": LossConfig(name="kl_cov", ratio=2e-3),
}


def _batch(cfg, b, p, r, seed=0) -> Batch:
  rng = np.random.default_rng(seed)
  s = p + r
  tokens = rng.integers(1, cfg.vocab_size, size=(b, s)).astype(np.int32)
  mask = np.ones((b, r), np.float32)
  return Batch(tokens=jnp.asarray(tokens), positions=jnp.tile(jnp.arange(s, dtype=jnp.int32), (b, 1)),
               attention_mask=jnp.ones((b, s), jnp.int32), response_mask=jnp.asarray(mask),
               advantages=jnp.asarray(rng.normal(size=(b, 1)).astype(np.float32) * mask),
               old_log_prob=jnp.asarray(-rng.uniform(0.5, 3, size=(b, r)).astype(np.float32)),
               ref_log_prob=jnp.zeros((b, r)))


def _time(fn, reps):
  ts = []
  for _ in range(reps):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    ts.append(time.perf_counter() - t)
  return float(np.median(ts))


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--reps", type=int, default=5)
  ap.add_argument("--skip-135m", action="store_true")
  args = ap.parse_args()
  print(f"jax {jax.__version__}, devices {jax.devices()}")
  for name, (cfg, b, p, r) in MODELS.items():
    if args.skip_135m and "135M" in name:
      continue
    params = models.init_model(cfg, seed=0).params
    batch = _batch(cfg, b, p, r)
    n_tok = b * (p + r)
    tx = S.make_optimizer(OptimConfig(lr=1e-5), 100)
    base = None
    for lname, lc in LOSSES.items():
      spec = S.StepSpec(model=cfg, loss=lc)
      step = jax.jit(functools.partial(S.train_step_impl, spec, tx), donate_argnums=(0,))
      state = S.init_state(jax.tree.map(jnp.copy, params), tx, jax.random.PRNGKey(0))
      state, _ = step(state, batch)          # compile
      holder = {"s": state}

      def run():
        holder["s"], m = step(holder["s"], batch)
        return m["loss"]
      t_step = _time(run, args.reps)
      base = base or t_step
      line = (f"{name:11s} {lname:9s} B={b} P+R={p + r}: step {t_step * 1e3:8.1f} ms "
              f"({n_tok / t_step:9.0f} tokens/s, {t_step / base:4.2f}x ppo_clip)")
      if lname != "ppo_clip":
        lp = batch.old_log_prob + 0.01
        if lname == "kl_cov":
          sel = jax.jit(lambda lp: losses.select_kl_cov(lp, batch.advantages, batch.response_mask,
                                                        ratio=lc.ratio))
        else:
          sel = jax.jit(lambda lp: losses.select_clip_cov(
              lp, batch.old_log_prob, batch.advantages, batch.response_mask, key=jax.random.PRNGKey(1),
              ratio=lc.ratio, cov_lb=lc.cov_lb, cov_ub=lc.cov_ub, clip_low=0.2, clip_high=0.2))
        jax.block_until_ready(sel(lp))
        t_sel = _time(lambda: sel(lp), max(args.reps, 20))
        line += f"; selection {t_sel * 1e3:.3f} ms = {100 * t_sel / t_step:.2f}% of the update"
      print(line, flush=True)


if __name__ == "__main__":
  main()
