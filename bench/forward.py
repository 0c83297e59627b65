"""Forward throughput of jaxent.models vs transformers' PyTorch model (same weights, CPU).

A random SmolLM2-135M-shaped Llama (hidden 576, 30 layers, 9 heads / 3 kv
heads, SwiGLU 1536, vocab 49152, tied embeddings) is built in PyTorch,
written as a safetensors checkpoint and loaded by jaxent, so both run the
same weights. Both compute full float32 logits for a [batch, seq] batch;
the figure is tokens per second (median of the repeats) and the ratio
jaxent / torch (target: >= 1).

  .venv/bin/python bench/forward.py [--batch 4] [--seq 128] [--repeats 3]
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--batch", type=int, default=4)
  ap.add_argument("--seq", type=int, default=128)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--layers", type=int, default=30)
  ap.add_argument("--threads", type=int, default=os.cpu_count(),
                  help="torch intra-op threads (XLA:CPU uses one per core)")
  args = ap.parse_args()

  import jax
  import numpy as np
  import torch
  import transformers

  from jaxent import models

  torch.set_num_threads(args.threads)
  hf_cfg = transformers.LlamaConfig(
      vocab_size=49152, hidden_size=576, intermediate_size=1536,
      num_hidden_layers=args.layers, num_attention_heads=9, num_key_value_heads=3,
      max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=True,
      rope_parameters={"rope_type": "default", "rope_theta": 1e5})
  torch.manual_seed(0)
  tm = transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.float32).eval()
  n_params = sum(p.numel() for p in tm.parameters())
  with tempfile.TemporaryDirectory() as d:
    tm.save_pretrained(d)
    jm = models.from_pretrained(d, dtype="float32")

  tokens = np.random.RandomState(0).randint(0, hf_cfg.vocab_size, (args.batch, args.seq))
  tokens = tokens.astype(np.int32)
  ttok = torch.as_tensor(tokens, dtype=torch.long)
  fwd = jax.jit(lambda p, t: models.apply(jm.config, p, t)[0])

  def run_jax():
    return jax.block_until_ready(fwd(jm.params, tokens))

  def run_torch():
    with torch.inference_mode():
      return tm(ttok).logits

  t0 = time.perf_counter()
  lj = np.asarray(run_jax())
  compile_s = time.perf_counter() - t0
  lt = run_torch().numpy()  # warm-up
  err = float(np.abs(lj - lt).max() / np.abs(lt).max())

  def timeit(f):
    times = []
    for _ in range(args.repeats):
      t0 = time.perf_counter()
      f()
      times.append(time.perf_counter() - t0)
    return statistics.median(times)

  # Interleave so a load spike from other processes hits both alike.
  tj, tt = [], []
  for _ in range(2):
    tj.append(timeit(run_jax))
    tt.append(timeit(run_torch))
  tj, tt = min(tj), min(tt)
  n = args.batch * args.seq
  print(f"model: SmolLM2-135M shape, {args.layers} layers, {n_params / 1e6:.1f}M params, "
        f"float32; batch {args.batch} x seq {args.seq}; torch threads {args.threads}; "
        f"jax devices {jax.devices()[0].platform} x{len(jax.devices())}")
  print(f"max |logits diff| / max |logits| = {err:.2e}; jaxent compile {compile_s:.1f} s")
  print(f"jaxent : {n / tj:9.0f} tokens/s  ({tj * 1e3:.0f} ms / forward)")
  print(f"torch  : {n / tt:9.0f} tokens/s  ({tt * 1e3:.0f} ms / forward)")
  print(f"ratio jaxent/torch: {tt / tj:.2f}x")


if __name__ == "__main__":
  main()
