"""Next-token sampling from logits: temperature, top-k, top-p, greedy.

All functions are pure, jit-able and shape-static. ``temperature``, ``top_k``
and ``top_p`` are traced scalars, so changing them between calls never
recompiles.

Semantics follow the Hugging Face warpers applied in their order
(``TemperatureLogitsWarper`` -> ``TopKLogitsWarper`` -> ``TopPLogitsWarper``,
``min_tokens_to_keep=1``), with one documented difference at ties:

* temperature: ``z = logits / T``; ``T = 0`` means greedy (``argmax`` of the
  raw logits, lowest token id among equal maxima, as ``torch.argmax``).
* top-k (``k > 0``): keep every token whose scaled logit is ``>=`` the k-th
  largest one. Tokens tied with the k-th value are all kept (exactly as HF),
  so more than k tokens survive only when there are ties at the boundary.
  ``k <= 0`` disables it; ``k > V`` keeps everything.
* top-p (``p < 1``): on the top-k-filtered distribution ``q = softmax(z)``
  sorted ascending with cumulative mass ``c``, remove the tokens with
  ``c <= 1 - p``; the most likely token is always kept. This keeps the
  smallest set of most-likely tokens whose mass is ``>= p``. Ties: we keep
  every token whose logit equals the smallest kept logit, whereas HF keeps an
  arbitrary subset of such ties (whatever order ``torch.sort`` returns).
  Without ties the two kept sets are identical. ``p >= 1`` disables it.

The truncated distribution is ``pi_trunc(a) ∝ exp(z_a)`` on the kept set and
0 elsewhere; it is the distribution the token is drawn from, and its
log-probability of the drawn token is what ``logprobs`` reports. The
untruncated temperature-scaled policy ``log softmax(z)_a`` is reported as
``policy_logprobs``; this is the ``log pi`` that an RL objective uses.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def scale_logits(logits: jax.Array, temperature) -> jax.Array:
  """``logits / T`` in float32; ``T <= 0`` (greedy) scales by 1.

  Logits are upcast to float32 before any softmax: bfloat16 has 8 mantissa
  bits, too few for log-probs that RL ratios ``exp(log pi - log pi_old)`` use.
  """
  t = jnp.asarray(temperature, jnp.float32)
  return logits.astype(jnp.float32) / jnp.where(t > 0, t, 1.0)


def truncate_logits(z: jax.Array, top_k, top_p) -> jax.Array:
  """Top-k then top-p truncation of scaled logits ``z`` ``[..., V]``.

  Returns ``z`` with the removed entries set to ``-inf``. One ascending sort
  per call serves both filters; the kept set is ``z >= threshold``, with the
  threshold read from the sorted values at a traced rank, so ``k`` and ``p``
  stay traced. When neither filter is active (``k <= 0`` and ``p >= 1``) the
  sort is skipped by a ``lax.cond``.
  """
  z = z.astype(jnp.float32)
  top_k = jnp.asarray(top_k, jnp.int32)
  top_p = jnp.asarray(top_p, jnp.float32)
  v = z.shape[-1]

  def _truncate(z):
    asc = jnp.sort(z, axis=-1)
    # top-k: threshold = k-th largest value (ascending index V - k).
    k = jnp.clip(top_k, 1, v)
    thr_k = lax.dynamic_index_in_dim(asc, v - k, axis=-1, keepdims=True)
    thr_k = jnp.where(top_k > 0, thr_k, -jnp.inf)
    asc = jnp.where(asc >= thr_k, asc, -jnp.inf)
    # top-p on the top-k-filtered distribution, in HF's ascending order.
    cum = jnp.cumsum(jax.nn.softmax(asc, axis=-1), axis=-1)
    remove = cum <= (1.0 - top_p)
    remove = remove.at[..., -1].set(False)  # always keep the most likely token
    # ``cum`` is non-decreasing, so ``remove`` is a prefix of the ascending
    # order and the kept set is ``z >= asc[n_removed]``.
    n_removed = jnp.sum(remove, axis=-1, keepdims=True)
    thr_p = jnp.take_along_axis(asc, n_removed, axis=-1)
    thr_p = jnp.where(top_p < 1.0, thr_p, -jnp.inf)
    thr = jnp.maximum(thr_k, thr_p)
    return jnp.where(z >= thr, z, -jnp.inf)

  active = (top_k > 0) | (top_p < 1.0)
  return lax.cond(active, _truncate, lambda z: z, z)


_BLOCK = 256  # vocabulary block of the two-stage inverse-CDF draw


def _inverse_cdf(w: jax.Array, u: jax.Array) -> jax.Array:
  """Index ``i`` with ``cum_{i-1} <= u * total < cum_i`` for weights ``w [B, n] >= 0``.

  Only entries with ``w > 0`` can be returned (rounding in the cumulative
  sum must never pick a removed token); if ``u * total`` rounds up to the
  total, the last positive entry is taken.
  """
  n = w.shape[-1]
  cum = jnp.cumsum(w, axis=-1)
  x = u[:, None] * cum[:, -1:]
  hit = (cum > x) & (w > 0)
  last_pos = n - 1 - jnp.argmax((w > 0)[:, ::-1], axis=-1)
  return jnp.where(jnp.any(hit, axis=-1), jnp.argmax(hit, axis=-1), last_pos)


def categorical(key: jax.Array, z: jax.Array) -> jax.Array:
  """Draws ``a ~ softmax(z)`` per row of ``z [B, V]`` (``-inf`` entries never).

  Two-stage inverse CDF over vocabulary blocks of 256: a block by its mass,
  then a token within it, each with its own uniform. The law is exactly
  ``P(block) P(token | block) = softmax(z)``, and it needs 2 random numbers
  per row instead of the V of Gumbel-max (``jax.random.categorical``),
  whose V threefry draws per row cost more than the model's LM head on CPU.
  Each stage resolves probabilities to float32 uniform precision (``2^-23``)
  relative to its own mass — the same order as Gumbel-max's float32 tail.
  """
  b, v = z.shape
  nb = -(-v // _BLOCK)
  e = jnp.exp(z - jnp.max(z, axis=-1, keepdims=True))  # 0 at -inf
  e = jnp.pad(e, ((0, 0), (0, nb * _BLOCK - v))).reshape(b, nb, _BLOCK)
  u1, u2 = _uniforms(key, b)
  blk = _inverse_cdf(jnp.sum(e, axis=-1), u1)
  inner = jnp.take_along_axis(e, blk[:, None, None], axis=1)[:, 0]
  tok = blk * _BLOCK + _inverse_cdf(inner, u2)
  return tok.astype(jnp.int32)


def is_row_keys(key: jax.Array) -> bool:
  """Whether ``key`` is a batch of keys (typed ``[B]`` or raw ``uint32 [B, 2]``)."""
  typed = jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
  return key.ndim == (1 if typed else 2)


def _uniforms(key: jax.Array, b: int) -> tuple[jax.Array, jax.Array]:
  """Two float32 uniforms ``[B]`` each: from one key for the batch, or one key per row.

  With per-row keys, row ``i``'s uniforms depend on ``key[i]`` alone, so a
  row's draw does not depend on the batch it is computed in.
  """
  if is_row_keys(key):
    if key.shape[0] != b:
      raise ValueError(f"categorical: {key.shape[0]} row keys for {b} rows")

    def one(k):
      k1, k2 = jax.random.split(k)
      return jax.random.uniform(k1, ()), jax.random.uniform(k2, ())

    return jax.vmap(one)(key)
  k1, k2 = jax.random.split(key)
  return jax.random.uniform(k1, (b,)), jax.random.uniform(k2, (b,))


def _logprob_of(z: jax.Array, tokens: jax.Array) -> jax.Array:
  """``log softmax(z)[tokens]`` without materializing the full log-softmax."""
  picked = jnp.take_along_axis(z, tokens[..., None], axis=-1)[..., 0]
  return picked - jax.nn.logsumexp(z, axis=-1)


def sample_logits(logits: jax.Array, key: jax.Array, temperature=1.0, top_k=0,
                  top_p=1.0) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Draws one token per row from ``logits`` ``[B, V]``.

  Args:
    logits: ``[B, V]`` next-token logits, any float dtype.
    key: PRNG key (rows draw independent uniforms from it), or one key per
      row (``[B]`` typed keys or ``uint32 [B, 2]``): row ``i`` draws from
      ``key[i]`` alone, whatever the other rows.
    temperature: traced scalar ``T``; ``T <= 0`` is greedy.
    top_k: traced int scalar; ``<= 0`` disables.
    top_p: traced float scalar; ``>= 1`` disables.

  Returns:
    ``(tokens, logprobs, policy_logprobs)``, each ``[B]``:
    tokens int32; ``logprobs = log pi_trunc(token)`` under the distribution
    actually sampled from (greedy: the point mass at the argmax, so 0);
    ``policy_logprobs = log softmax(logits / T)[token]``, the untruncated
    temperature-scaled policy (greedy: ``T`` taken as 1, i.e. the model's own
    distribution, since ``T -> 0`` has no finite log-density).
  """
  z = scale_logits(logits, temperature)
  greedy = jnp.asarray(temperature, jnp.float32) <= 0

  def _greedy(z):
    tok = jnp.argmax(z, axis=-1).astype(jnp.int32)
    return tok, jnp.zeros(tok.shape, jnp.float32)

  def _sample(z):
    zt = truncate_logits(z, top_k, top_p)
    tok = categorical(key, zt)  # removed (-inf) entries are never drawn
    return tok, _logprob_of(zt, tok)

  tokens, logprobs = lax.cond(greedy, _greedy, _sample, z)
  return tokens, logprobs, _logprob_of(z, tokens)
