"""Continuous batching vs the static sampler on long-tailed response lengths (same process).

Rows: ``--prompts`` prompts x ``--samples`` samples, each row with its own
budget drawn from a lognormal (median ``--median``, sigma ``--sigma``,
capped at ``--max-new``, seeded), no EOS, so every row generates exactly its
budget and both engines do the same work. The static engine decodes all rows
until the longest ends; the continuous engine decodes ``--slots`` rows at a
time and refills finished ones. Reported per engine: wall time (the second of
the best of ``--repeats`` runs after a compiling one), generated tokens/s, slot utilisation
(generated tokens / row draws computed, ``SampleStats``) and decode steps;
then the wall-time ratio and whether the tokens are identical row by row.
``--uniform`` gives every row ``--max-new`` tokens (continuous must not lose
there).

The issue's setting is a 135M Llama (``--model 135m``), 8 x 8 rows, median
64, cap 512; on the shared 2-core CPU that takes minutes per engine, so the
default is a small Llama-shaped model and shorter responses:

  python bench/rollout_engine.py                     # small model, ~1 min
  python bench/rollout_engine.py --uniform
  python bench/rollout_engine.py --model 135m --median 64 --max-new 512 --slots 16
  python bench/rollout_engine.py --compute-dtype bfloat16   # bfloat16 weights and cache
  python bench/rollout_engine.py --model demo --prompts 32 --uniform --max-new 12 --slots 64
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from jaxent import models, sampler  # noqa: E402

SHAPES = {
    # SmolLM2-135M (Llama, tied embeddings)
    "135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
                 num_heads=9, num_kv_heads=3, head_dim=64),
    # a small Llama-shaped model for the 2-core CPU
    "small": dict(vocab_size=8192, hidden_size=384, intermediate_size=1024, num_layers=6,
                  num_heads=6, num_kv_heads=2, head_dim=64),
    # the demo's policy (configs/demo.yaml: Qwen2 shape, 0.12M parameters, llama-style here)
    "demo": dict(vocab_size=15, hidden_size=64, intermediate_size=256, num_layers=2,
                 num_heads=4, num_kv_heads=2, head_dim=16),
}


def budgets_of(args) -> list[int]:
  rows = args.prompts * args.samples
  if args.uniform:
    return [args.max_new] * rows
  rng = np.random.default_rng(args.seed)
  draw = np.exp(np.log(args.median) + args.sigma * rng.standard_normal(rows))
  return np.clip(np.round(draw), 1, args.max_new).astype(int).tolist()


def run_once(model, prompts, budgets, args, **engine):
  """(wall s, process CPU s, tokens, stats) of one generation."""
  kw = dict(max_new_tokens=args.max_new, key=jax.random.key(args.seed), temperature=1.0,
            num_samples=args.samples, budgets=budgets, compute_dtype=args.compute_dtype, **engine)
  t0, c0 = time.perf_counter(), time.process_time()
  out = sampler.generate(model, prompts, **kw)
  tokens = np.asarray(out.tokens)
  return time.perf_counter() - t0, time.process_time() - c0, tokens, jax.device_get(out.stats)


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--model", choices=sorted(SHAPES), default="small")
  ap.add_argument("--prompts", type=int, default=8)
  ap.add_argument("--samples", type=int, default=8)
  ap.add_argument("--median", type=float, default=24.0)
  ap.add_argument("--sigma", type=float, default=0.8)
  ap.add_argument("--max-new", type=int, default=192)
  ap.add_argument("--slots", type=int, default=16)
  ap.add_argument("--steps-per-call", type=int, default=None)
  ap.add_argument("--uniform", action="store_true")
  ap.add_argument("--compute-dtype", default=None,
                  help="generate from copies of the weights in this dtype (e.g. bfloat16)")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--repeats", type=int, default=3)
  args = ap.parse_args()

  cfg = models.ModelConfig(model_type="llama", tie_word_embeddings=True, **SHAPES[args.model])
  model = models.init_model(cfg, seed=0)
  rng = np.random.default_rng(args.seed + 1)
  prompts = [rng.integers(1, cfg.vocab_size, size=int(n)).tolist()
             for n in rng.integers(8, 17, size=args.prompts)]
  per_row = args.samples > 1 and not args.uniform
  budgets = budgets_of(args)
  lens = np.asarray(budgets)
  print(f"model {args.model} ({sum(x.size for x in jax.tree.leaves(model.params)) / 1e6:.1f}M), "
        f"{args.prompts} prompts x {args.samples} samples, budgets mean {lens.mean():.1f} "
        f"median {np.median(lens):.0f} max {lens.max()} (per row: {per_row}), "
        f"{jax.devices()[0].platform}")
  engines = {"static": dict(engine="static"),
             "continuous": dict(engine="continuous", slots=args.slots,
                                steps_per_call=args.steps_per_call)}
  res = {}
  for name, eng in engines.items():  # compile
    run_once(model, prompts, budgets, args, **eng)
  for _ in range(args.repeats):  # alternating runs, the best of each: the machine is shared
    for name, eng in engines.items():
      dt, cpu, tokens, st = run_once(model, prompts, budgets, args, **eng)
      old = res.get(name, (np.inf, np.inf))
      res[name] = (min(dt, old[0]), min(cpu, old[1]), tokens, st)
  for name, (dt, cpu, _, st) in res.items():
    gen = int(st.generated_tokens)
    print(f"{name:>10}: {dt:7.2f} s wall {cpu:7.2f} s CPU  {gen / dt:8.1f} tok/s  utilisation "
          f"{gen / int(st.slot_steps):6.1%}  decode steps {int(st.decode_steps)}  "
          f"({gen} tokens, {int(st.slot_steps)} row draws)")
  same = np.array_equal(res["static"][2], res["continuous"][2])
  print(f"static / continuous: wall time {res['static'][0] / res['continuous'][0]:.2f}x, "
        f"CPU time {res['static'][1] / res['continuous'][1]:.2f}x; "
        f"tokens identical row by row: {same}")


if __name__ == "__main__":
  main()
