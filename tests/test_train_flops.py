"""bench/_flops.py: the update step's FLOP count, against hand arithmetic and XLA's own count."""
import dataclasses
import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxent import models, train
from jaxent.config import LossConfig, OptimConfig
from jaxent.types import Batch

_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "_flops.py")
_spec = importlib.util.spec_from_file_location("bench_flops", _PATH)
F = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(F)


def _qwen2(**kw):
  arch = dict(model_type="qwen2", vocab_size=512, hidden_size=128, num_layers=2, num_heads=4,
              num_kv_heads=2, head_dim=32, intermediate_size=384, tie_word_embeddings=True,
              dtype="bfloat16", param_dtype="float32")
  arch.update(kw)
  return models.ModelConfig(**arch)


def test_counts_by_hand():
  # D=8, H=2, K=1, N=4, F=16, L=1, V=10; B=1 row of P=1 + R=2 tokens (T=3).
  cfg = models.ModelConfig(model_type="llama", vocab_size=10, hidden_size=8, num_layers=1, num_heads=2,
                           num_kv_heads=1, head_dim=4, intermediate_size=16)
  w = 8 * 4 * 4 + 2 * 4 * 8 + 3 * 8 * 16          # q,k,v + o + gate,up,down = 576
  assert F.layer_matmul_weights(cfg) == w
  stack = 6 * w * 3                                # 10368
  att_causal = 12 * 2 * 4 * 6                      # 6 causal pairs (1 + 2 + 3): 576
  att_full = 12 * 2 * 4 * 9                        # 9 pairs: 864
  head = 6 * 8 * 10 * 2                            # 2 response positions: 960
  fl = F.update_flops(cfg, 1, 1, 2)
  assert fl.model == stack + att_causal + head == 11904
  assert fl.model_full_attention == stack + att_full + head
  # executed: dense T^2 attention; logits recomputed in the backward pass (8 D V per position)
  assert fl.executed == stack + att_full + 8 * 8 * 10 * 2
  rem = F.update_flops(dataclasses.replace(cfg, remat=True), 1, 1, 2)
  assert rem.model == fl.model
  assert rem.executed == fl.executed + 2 * w * 3 + 4 * 2 * 4 * 9


def test_layer_weights_match_the_model_parameters():
  # The analytic W_layer equals the size of every kernel the model actually holds per layer.
  cfg = _qwen2(num_kv_heads=1, intermediate_size=200)
  shapes = models.param_shapes(cfg)["layers"]
  kernels = sum(int(np.prod(s.shape)) for name, s in shapes.items() if name.endswith("_kernel"))
  assert kernels == cfg.num_layers * F.layer_matmul_weights(cfg)


def test_logits_chunk_padding():
  # R = 300 runs as two 256-position logits chunks: 512 padded positions, each
  # 8 D V (forward, its recompute, two backward matmuls); the model count keeps 6 D V x 300.
  cfg = _qwen2()
  dv = cfg.hidden_size * cfg.vocab_size
  fl = F.update_flops(cfg, 2, 16, 300)
  without_head = fl.model_full_attention - 6 * dv * 2 * 300
  assert fl.executed == without_head + 8 * dv * 2 * 512


def test_executed_flops_match_xla_cost_analysis():
  # XLA's HloCostAnalysis counts a while loop's body once, whatever its trip
  # count, so the shape keeps every loop trivial: <= 4 layers (the stack is
  # unrolled), T <= attention_chunk (whole attention), R <= 256 (one logits
  # chunk). XLA also counts elementwise work (norms, softmax, RoPE, AdamW),
  # which the analytic count leaves out: measured +4.5% here.
  cfg = _qwen2()
  b, p, r = 2, 16, 48
  t = p + r
  rng = np.random.default_rng(0)
  batch = Batch(tokens=jnp.asarray(rng.integers(1, cfg.vocab_size, (b, t)), jnp.int32),
                positions=jnp.tile(jnp.arange(t, dtype=jnp.int32), (b, 1)),
                attention_mask=jnp.ones((b, t), jnp.int32), response_mask=jnp.ones((b, r)),
                advantages=jnp.ones((b, r)), old_log_prob=-jnp.ones((b, r)), ref_log_prob=jnp.zeros((b, r)))
  tx = train.make_optimizer(OptimConfig(lr=1e-5), 100)
  spec = train.StepSpec(model=cfg, loss=LossConfig(name="ppo_clip"))
  state = jax.eval_shape(lambda: train.init_state(models.init_params(cfg, jax.random.key(0)), tx,
                                                  jax.random.PRNGKey(0)))
  cost = train.jit_train_step(spec, tx).lower(state, batch).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  fl = F.update_flops(cfg, b, p, r)
  assert 1.0 <= cost["flops"] / fl.executed < 1.10, (cost["flops"], fl)
  # the model count is below what runs: the masked attention half and the logits recompute
  assert fl.model < fl.model_full_attention < fl.executed


def test_peak_table_and_bad_input():
  assert F.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
  assert F.peak_flops("TPU v5 lite") == 197e12
  assert F.peak_flops("cpu") is None
  with pytest.raises(ValueError, match="response must be a positive int, got 0"):
    F.update_flops(_qwen2(), 1, 4, 0)
