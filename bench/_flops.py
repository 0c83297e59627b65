"""FLOPs of one update step and the device's peak FLOP/s: the MFU arithmetic.

Counts are analytic, from the model config and the mini-batch shape (``B``
rows of ``T = P + R`` tokens, ``P`` prompt and ``R`` response). A matmul of
an ``[m, k]`` by a ``[k, n]`` matrix is ``2mkn`` FLOPs; its backward pass is
two such matmuls (input and weight gradients), so forward + backward of a
weight applied to ``n_tok`` tokens is ``6 · weights · n_tok`` (PaLM,
appendix B; MaxText's ``calculate_tflops_training_per_device``). Per layer
(``D`` embed, ``H`` query heads, ``K`` kv heads, ``N`` head_dim, ``F`` mlp
width) the matmul weights are::

  W_layer = D·(H + 2K)·N  (q, k, v)  +  H·N·D  (o)  +  3·D·F  (gate, up, down)

Model FLOPs (the MFU numerator) of one update, ppo_clip, one micro-batch:

  6 · L · W_layer · B·T                    the decoder stack, every token
  + 12 · L · H · N · B · T(T+1)/2          attention scores and values (q·k, p·v),
                                           forward + backward, causal pairs only
  + 6 · D · V · B·R                        the unembedding, response positions only

- Only the update's forward and backward pass are counted: the step takes
  the old policy's log-probs as input (the loop computes them in a separate
  jitted forward), and for ppo_clip with one micro-batch there is no extra
  selection forward. The embedding lookup is a gather (no FLOPs); the logits
  exist only at the ``R`` response positions, so the unembedding is charged
  for ``B·R`` tokens, not ``B·T`` (MaxText charges every position because a
  pre-training step needs them all). Norms, RoPE, biases, softmax, the loss
  and AdamW are elementwise and left out, as in both references.
- Attention: the causal form (``T(T+1)/2`` query-key pairs per row, as
  MaxText and Megatron-LM count it) because that is the work a causal model
  needs; the masked half that a dense implementation also computes is waste,
  like rematerialisation, and MFU should not reward it. PaLM's appendix B
  counts all ``T²`` pairs (``12·L·H·N·T`` per token); ``model_full_attention``
  is that form, printed beside it for comparison with figures that use it.

``executed`` is what this implementation asks XLA to multiply, for the
cross-check against ``cost_analysis()``: all ``T²`` attention pairs (the mask
is applied to dense scores); the unembedding over ``R`` padded up to whole
logits chunks (``ops.logprobs_and_entropy``, 256 positions) and recomputed in
the backward pass (the chunk is ``jax.checkpoint``-ed), ``8·D·V`` per padded
position; with ``T > attention_chunk`` the chunked attention's forward again
in the backward pass; with ``remat`` every layer's forward again.
"""
from __future__ import annotations

from typing import NamedTuple

# ops.logprobs_and_entropy's default chunk_size, which train_step uses.
LOGITS_CHUNK = 256

# Dense bfloat16 peak FLOP/s per device, keyed by jax's ``device.device_kind``
# (datasheet figures without 2:4 sparsity).
PEAK_BF16_FLOPS = {
    "NVIDIA H100 80GB HBM3": 989e12,   # H100 SXM5
    "NVIDIA H100 PCIe": 756e12,
    "NVIDIA H100 NVL": 835e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-SXM4-40GB": 312e12,
    "NVIDIA A100-PCIE-40GB": 312e12,
    "NVIDIA A100 80GB PCIe": 312e12,
    "TPU v4": 275e12,
    "TPU v5": 459e12,                  # v5p reports "TPU v5"
    "TPU v5p": 459e12,
    "TPU v5 lite": 197e12,             # v5e
    "TPU v5e": 197e12,
    "TPU v6 lite": 918e12,             # v6e (Trillium)
    "TPU v6e": 918e12,
}


def peak_flops(device_kind: str) -> float | None:
  """Dense bfloat16 peak FLOP/s of ``device_kind``, or None when the table lacks it."""
  return PEAK_BF16_FLOPS.get(device_kind)


class StepFlops(NamedTuple):
  model: float                 # the MFU numerator: causal attention (module docstring)
  model_full_attention: float  # the same with all T^2 attention pairs (PaLM's form)
  executed: float              # the matmul work this implementation runs (for the XLA cross-check)


def layer_matmul_weights(cfg) -> int:
  """``W_layer``: the weights of one layer's matmuls (biases and norm scales excluded)."""
  d, h, k, n, f = (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                   cfg.intermediate_size)
  return d * (h + 2 * k) * n + h * n * d + 3 * d * f


def update_flops(cfg, batch: int, prompt: int, response: int) -> StepFlops:
  """FLOPs of one ``train_step`` (ppo_clip, one micro-batch) on ``batch`` rows of ``prompt + response``.

  ``cfg`` is a ``jaxent.models.ModelConfig``; see the module docstring for
  what each count includes.
  """
  for name, v in (("batch", batch), ("prompt", prompt), ("response", response)):
    if not isinstance(v, int) or v < 1:
      raise ValueError(f"{name} must be a positive int, got {v!r}")
  b, t, r = batch, prompt + response, response
  n_layers, h, n = cfg.num_layers, cfg.num_heads, cfg.head_dim
  d, v = cfg.hidden_size, cfg.vocab_size
  stack = 6 * n_layers * layer_matmul_weights(cfg) * b * t
  att_fwd_per_pair = 4 * n_layers * h * n          # q·k and p·v, 2 FLOPs per multiply-add
  att_causal = 3 * att_fwd_per_pair * b * t * (t + 1) / 2
  att_full = 3 * att_fwd_per_pair * b * t * t
  head = 6 * d * v * b * r
  c = min(LOGITS_CHUNK, r)
  r_pad = -(-r // c) * c
  executed = stack + att_full + 8 * d * v * b * r_pad
  if 0 < cfg.attention_chunk < t:
    executed += att_fwd_per_pair * b * t * t
  if cfg.remat:
    executed += stack / 3 + att_fwd_per_pair * b * t * t
  return StepFlops(model=float(stack + att_causal + head),
                   model_full_attention=float(stack + att_full + head), executed=float(executed))
