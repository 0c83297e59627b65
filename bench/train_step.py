"""Update-step throughput: the selection's share of it, and model FLOPs utilisation.

Default mode: for each model (the demo's tiny Qwen2 and a 135M-parameter
Llama/SmolLM2 shape) and each loss, times the jitted, donated ``train_step``
on one mini-batch, and, separately, the jitted selection (``select_kl_cov`` /
``select_clip_cov``) on arrays of the same [B, R] shape — the selection's
share of the update is their ratio. Baselines run in the same process.

``--mfu``: one model (default a random Qwen2.5-0.5B shape), ``bfloat16``
compute over ``float32`` master weights and AdamW state, the ppo_clip step
on ``B`` rows of ``P + R`` tokens; prints the step time, tokens/s, the model
FLOPs of one update (bench/_flops.py says what is counted: forward and
backward of the update, causal attention, logits at response positions),
the achieved TFLOP/s, the device's peak (a table keyed by
``device_kind``, or ``--peak-tflops``) and MFU; n/a where the peak is unknown
(CPU).

  .venv/bin/python bench/train_step.py [--reps 5] [--skip-135m] [--model NAME]
  .venv/bin/python bench/train_step.py --mfu [--model qwen2-0.5B] [--batch 4 --prompt 512 \
      --response 1536] [--dtype bfloat16] [--remat] [--reps 10] [--peak-tflops 989]
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from _flops import peak_flops, update_flops
from jaxent import losses, models, train
from jaxent.config import LossConfig, OptimConfig
from jaxent.train import _step as S
from jaxent.types import Batch

# name: (config, B, P, R) -- the default mini-batch of each model.
MODELS = {
    "demo-0.12M": (models.ModelConfig(model_type="qwen2", vocab_size=15, hidden_size=64, num_layers=2,
                                      num_heads=4, num_kv_heads=2, head_dim=16, intermediate_size=256,
                                      tie_word_embeddings=True), 64, 12, 12),
    "llama-135M": (models.ModelConfig(model_type="llama", vocab_size=49152, hidden_size=576,
                                      num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64,
                                      intermediate_size=1536, tie_word_embeddings=True), 2, 64, 192),
    # Qwen2.5-0.5B: 494M parameters (136M in the tied embedding); --mfu only by default. B=4 of
    # 512 + 1536 tokens fits an 80 GB card without remat (bench/device_suite.sh has the arithmetic).
    "qwen2-0.5B": (models.ModelConfig(model_type="qwen2", vocab_size=151936, hidden_size=896,
                                      num_layers=24, num_heads=14, num_kv_heads=2, head_dim=64,
                                      intermediate_size=4864, tie_word_embeddings=True,
                                      rope_theta=1e6), 4, 512, 1536),
}
LOSS_MODE_MODELS = ("demo-0.12M", "llama-135M")
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


def _args():
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--reps", type=int, default=None, help="timed steps (default 5; --mfu: 10)")
  ap.add_argument("--skip-135m", action="store_true")
  ap.add_argument("--model", choices=sorted(MODELS), default=None,
                  help="one model (default: demo and 135M; --mfu: qwen2-0.5B)")
  ap.add_argument("--mfu", action="store_true", help="model FLOPs utilisation of the ppo_clip update")
  ap.add_argument("--batch", type=int, default=None, help="--mfu: rows B (default: the model's)")
  ap.add_argument("--prompt", type=int, default=None, help="--mfu: prompt tokens P per row")
  ap.add_argument("--response", type=int, default=None, help="--mfu: response tokens R per row")
  ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16",
                  help="--mfu: compute dtype (parameters and AdamW state stay float32)")
  ap.add_argument("--remat", action="store_true", help="--mfu: rematerialise each layer")
  ap.add_argument("--peak-tflops", type=float, default=None,
                  help="--mfu: the device's peak TFLOP/s (default: the table in bench/_flops.py)")
  args = ap.parse_args()
  for name in ("reps", "batch", "prompt", "response"):
    v = getattr(args, name)
    if v is not None and v < 1:
      ap.error(f"--{name} must be >= 1, got {v}")
  if args.peak_tflops is not None and args.peak_tflops <= 0:
    ap.error(f"--peak-tflops must be > 0, got {args.peak_tflops}")
  return args


def _size(n) -> str:
  return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def mfu(args):
  """Times the donated ppo_clip step on one mini-batch and prints FLOPs, TFLOP/s and MFU."""
  name = args.model or "qwen2-0.5B"
  cfg, b, p, r = MODELS[name]
  b, p, r = args.batch or b, args.prompt or p, args.response or r
  reps = args.reps or 10
  cfg = dataclasses.replace(cfg, dtype=args.dtype, param_dtype="float32", remat=args.remat)
  dev = jax.devices()[0]
  print(f"jax {jax.__version__}, device {dev.device_kind!r} ({dev.platform}), {jax.device_count()} device(s)")
  tx = train.make_optimizer(OptimConfig(lr=1e-5), 100)
  spec = train.StepSpec(model=cfg, loss=LossConfig(name="ppo_clip"))
  params = jax.jit(models.init_params, static_argnums=0)(cfg, jax.random.key(0))
  n_params = sum(x.size for x in jax.tree.leaves(params))
  state = train.init_state(params, tx, jax.random.PRNGKey(0))
  batch = _batch(cfg, b, p, r)
  n_tok = b * (p + r)
  print(f"model {name}: {n_params / 1e6:.1f}M parameters, compute {cfg.dtype.name}, parameters and "
        f"AdamW state {cfg.param_dtype.name}, remat {cfg.remat}; loss ppo_clip, 1 micro-batch")
  t0 = time.perf_counter()
  step = train.jit_train_step(spec, tx).lower(state, batch).compile()
  line = f"B={b} x (P={p} + R={r}) = {n_tok} tokens per step; compile {time.perf_counter() - t0:.1f} s"
  mem = step.memory_analysis()
  if mem is not None:
    line += (f"; XLA memory: arguments {_size(mem.argument_size_in_bytes)}, "
             f"temporaries {_size(mem.temp_size_in_bytes)}")
  print(line, flush=True)
  holder = {"s": state}

  def run():
    holder["s"], m = step(holder["s"], batch)
    return holder["s"], m

  jax.block_until_ready(run())  # the first call (allocation, autotuning) is not timed
  ts = []
  for _ in range(reps):
    t = time.perf_counter()
    _, m = jax.block_until_ready(run())
    ts.append(time.perf_counter() - t)
  t_step = float(np.median(ts))
  fl = update_flops(cfg, b, p, r)
  achieved = fl.model / t_step
  print(f"step {t_step * 1e3:.1f} ms (median of {reps}, min {min(ts) * 1e3:.1f}), "
        f"{n_tok / t_step:.0f} tokens/s, loss {float(m['loss']):.4f}")
  print(f"model FLOPs per step {fl.model:.4g} (causal attention; {fl.model_full_attention:.4g} with all "
        f"T^2 pairs); executed matmul FLOPs {fl.executed:.4g}")
  print(f"achieved {achieved / 1e12:.4g} TFLOP/s (model FLOPs / step time)")
  peak = args.peak_tflops * 1e12 if args.peak_tflops else peak_flops(dev.device_kind)
  if peak is None:
    print(f"peak n/a (device_kind {dev.device_kind!r} is not in bench/_flops.py; give --peak-tflops)")
    print("MFU n/a")
    return
  src = "--peak-tflops" if args.peak_tflops else f"bf16 dense, {dev.device_kind}"
  print(f"peak {peak / 1e12:.1f} TFLOP/s ({src})")
  note = "" if cfg.dtype.name == "bfloat16" else f", against the bfloat16 peak with {cfg.dtype.name} compute"
  print(f"MFU {100 * achieved / peak:.1f}% (all-pairs attention count: "
        f"{100 * fl.model_full_attention / t_step / peak:.1f}%{note})")


def main():
  args = _args()
  if args.mfu:
    return mfu(args)
  reps = args.reps or 5
  print(f"jax {jax.__version__}, devices {jax.devices()}")
  for name in (args.model,) if args.model else LOSS_MODE_MODELS:
    cfg, b, p, r = MODELS[name]
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
      t_step = _time(run, reps)
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
        t_sel = _time(lambda: sel(lp), max(reps, 20))
        line += f"; selection {t_sel * 1e3:.3f} ms = {100 * t_sel / t_step:.2f}% of the update"
      print(line, flush=True)


if __name__ == "__main__":
  main()
