"""Log-probabilities and entropy of sampled tokens, chunked over time.

A Qwen2.5 vocabulary has V = 152k entries; for an 8k-token response one row
of float32 logits is 5 GB. ``logprobs_and_entropy`` therefore walks the time
axis in chunks with ``lax.scan`` and ``jax.checkpoint``: the forward pass holds
one float32 ``[B, C, V]`` chunk at a time, and the backward pass recomputes
each chunk's softmax from its (saved) input slice instead of keeping every
chunk's softmax alive.

When the model hands over its final hidden states and unembedding matrix
(``HiddenAndHead``), even the low-precision ``[B, T, V]`` logits never exist:
each chunk's logits are computed, used and dropped inside the scan body.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxent.ops._checks import check_ndim, check_scalar, upcast


class HiddenAndHead(NamedTuple):
  """A model's output before the unembedding: ``logits = hidden @ kernel``.

  Attributes:
    hidden: final (normed) hidden states ``[B, T, D]``.
    kernel: unembedding matrix ``[D, V]`` (for tied embeddings pass
      ``embedding.T``; XLA folds the transpose into the matmul).
  """
  hidden: jax.Array
  kernel: jax.Array


def _entropy_and_token_logprob(z: jax.Array, tokens: jax.Array | None):
  """Entropy ``H = logsumexp(z) − Σ softmax(z)·z`` and ``log softmax(z)[token]``.

  ``z`` is at least float32. Works with ``-inf`` logits (e.g. banned tokens):
  their probability is 0 and they contribute 0 to the entropy and its gradient.
  """
  m = lax.stop_gradient(jnp.max(z, axis=-1, keepdims=True))  # shift only; H is shift-invariant
  s = z - m
  lse = jnp.log(jnp.sum(jnp.exp(s), axis=-1))
  p = jnp.exp(s - lse[..., None])
  # p·s is 0·(-inf) = NaN where p == 0; the inner where keeps that out of the
  # value and the outer one out of the gradient.
  live = p > 0
  ent = lse - jnp.sum(jnp.where(live, p * jnp.where(live, s, 0), 0), axis=-1)
  if tokens is None:
    return ent, None
  # Compare against an iota rather than gather: a vocab-sharded chunk then
  # reduces locally and all-reduces one scalar per token.
  vocab = lax.broadcasted_iota(jnp.int32, s.shape, s.ndim - 1)
  s_tok = jnp.sum(jnp.where(vocab == tokens[..., None], s, 0), axis=-1)
  return ent, s_tok - lse


def entropy_from_logits(logits: jax.Array) -> jax.Array:
  """Entropy of ``softmax(logits)`` over the last axis, in float32.

  ``H(z) = logsumexp(z) − Σ_a softmax(z)_a z_a``. The whole input is upcast at
  once; for ``[B, T, V]`` logits of a large vocabulary use
  ``logprobs_and_entropy``, which upcasts one chunk at a time.

  Args:
    logits: ``[..., V]`` of any float dtype.

  Returns:
    ``[...]`` float32 (float64 for float64 input).
  """
  if jnp.ndim(logits) < 1:
    raise ValueError(f"logits must have a vocabulary axis, got shape {jnp.shape(logits)}")
  ent, _ = _entropy_and_token_logprob(upcast(logits), None)
  return ent


@jax.checkpoint
def _chunk_from_logits(logits_c, tokens_c, temperature):
  # Upcast inside the chunk: softmax over 152k entries in bfloat16 loses the
  # small probabilities entirely, and only one chunk may exist in float32.
  z = upcast(logits_c) / temperature
  ent, lp = _entropy_and_token_logprob(z, tokens_c)
  return lp, ent


@jax.checkpoint
def _chunk_from_hidden(hidden_c, tokens_c, kernel, temperature):
  # bf16 x bf16 matmul accumulated in float32; the logits chunk is born float32.
  dtype = jnp.promote_types(jnp.result_type(hidden_c, kernel), jnp.float32)
  z = jnp.einsum("BCD,DV->BCV", hidden_c, kernel, preferred_element_type=dtype)
  z = z / temperature
  ent, lp = _entropy_and_token_logprob(z, tokens_c)
  return lp, ent


def _time_chunks(x: jax.Array, n: int, c: int) -> jax.Array:
  """``[B, T, ...]`` → ``[n, B, c, ...]``, zero-padding time to ``n·c``."""
  pad = n * c - x.shape[1]
  if pad:
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
  x = x.reshape((x.shape[0], n, c) + x.shape[2:])
  return jnp.moveaxis(x, 1, 0)


def logprobs_and_entropy(logits_or_model_output, tokens: jax.Array, *, temperature=1.0,
                         chunk_size: int = 256) -> tuple[jax.Array, jax.Array]:
  """Log-probability of each sampled token and the entropy of each position.

  With ``z = logits / temperature`` (float32): ``log π(y_t) = z_{y_t} −
  logsumexp(z)`` and ``H_t = logsumexp(z) − Σ_a softmax(z)_a z_a``.

  At most one float32 chunk ``[B, chunk_size, V]`` exists at a time, in the
  forward and (through ``jax.checkpoint``) the backward pass. Memory per
  chunk is ``4·B·chunk_size·V`` bytes: lower ``chunk_size`` for large ``B``.

  Args:
    logits_or_model_output: logits ``[B, T, V]`` (any float dtype) or a
      ``HiddenAndHead(hidden [B, T, D], kernel [D, V])``, which never forms
      ``[B, T, V]`` logits at all.
    tokens: int ``[B, T]``, the sampled tokens ``y_t`` (aligned with the
      logits that predicted them).
    temperature: sampling temperature (Python float or traced scalar, > 0).
    chunk_size: static number of time steps per chunk.

  Returns:
    ``(log_probs, entropy)``, each float32 ``[B, T]``.
  """
  if not isinstance(chunk_size, int) or chunk_size < 1:
    raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
  check_scalar("temperature", temperature, low=0, low_open=True)
  head = isinstance(logits_or_model_output, HiddenAndHead)
  if head:
    hidden, kernel = logits_or_model_output
    check_ndim("hidden", hidden, 3, "a [batch, time, embed] array")
    check_ndim("kernel", kernel, 2, "an [embed, vocab] matrix")
    if kernel.shape[0] != hidden.shape[-1]:
      raise ValueError(f"kernel has shape {kernel.shape}, but hidden has embed size "
                       f"{hidden.shape[-1]}; kernel must be [embed, vocab]")
    x = hidden
  else:
    x = jnp.asarray(logits_or_model_output)
    check_ndim("logits", x, 3, "a [batch, time, vocab] array")
  what = "hidden" if head else "logits"
  if tuple(jnp.shape(tokens)) != tuple(x.shape[:2]):
    raise ValueError(f"tokens has shape {tuple(jnp.shape(tokens))}, but {what} has [batch, time] = "
                     f"{tuple(x.shape[:2])}; they must match")
  if not jnp.issubdtype(jnp.result_type(tokens), jnp.integer):
    raise ValueError(f"tokens must be an integer array, got dtype {jnp.result_type(tokens)}")
  b, t = tokens.shape
  c = min(chunk_size, t)
  n = -(-t // c)
  xs = _time_chunks(x, n, c)
  toks = _time_chunks(jnp.asarray(tokens, jnp.int32), n, c)
  temperature = jnp.asarray(temperature, jnp.promote_types(x.dtype, jnp.float32))

  def body(carry, chunk):
    x_c, tok_c = chunk
    if head:
      return carry, _chunk_from_hidden(x_c, tok_c, kernel, temperature)
    return carry, _chunk_from_logits(x_c, tok_c, temperature)

  _, (lp, ent) = lax.scan(body, None, (xs, toks))

  def unchunk(y):  # [n, B, c] -> [B, T]
    return jnp.moveaxis(y, 0, 1).reshape(b, n * c)[:, :t]

  return unchunk(lp), unchunk(ent)
