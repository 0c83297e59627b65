"""Masked grouped-query attention, whole or in query chunks (memory-efficient).

Dimension letters: B batch, T query time, S key slots, H query heads, K
key/value heads, G = H // K queries per kv head, N head_dim; ``c`` the query
chunk.

For one query ``t`` of head ``h = k * G + j`` (HF's ``repeat_kv`` order)::

  s_ts = <q_t, k_s> / sqrt(N)   if mask[t, s]   else  float32 min
  p_t  = softmax_s(s_t)          (float32, then cast to the compute dtype)
  o_t  = sum_s p_ts v_s

Whole attention materialises ``s`` and ``p`` as float32 ``[B, K, G, T, S]``,
and the backward pass holds them and their cotangents: ``4 * H * T * S * 4``
bytes per row, ~47 GB for one 10240-token row of Qwen2.5-7B (28 heads).
Each query's softmax only needs its own row of scores, so splitting the
queries into chunks of ``c`` rows computes the same numbers (the softmax is
exact, not an online rescaling) with ``[B, K, G, c, S]`` at a time. The
chunks run in a ``lax.scan`` whose body is ``jax.checkpoint``-ed: the
backward pass keeps only the body's inputs per chunk and recomputes that
chunk's scores, so forward and backward hold ``4 * H * c * S * 4`` bytes
(plus the kv cotangents ``[B, S, K, N]``, accumulated across chunks). The
price is one more ``q k^T`` and softmax per chunk in the backward pass, as
in flash attention. ``T`` need not be a multiple of ``c``: the last
``T mod c`` queries are one more, shorter call of the same body.

Masked scores are set to float32 min rather than -inf, so a query with no
visible key (a left-pad query) gets a uniform, finite softmax instead of NaN;
its output is garbage that callers mask out. Chunking keeps this rule.

Fused kernels. On GPU, ``jax.nn.dot_product_attention(implementation=
"cudnn")`` (flash attention) is the natural next step, but it is not
dispatched here: it takes float16/bfloat16 only (jaxent's paper recipes
compute in float32), left-padded rows need an explicit ``[B, T, S]`` mask
rather than its sequence lengths, and its result for a query with no
visible key is not the uniform softmax above. A caller computing in
bfloat16 on GPU could route ``attention`` there when ``mask`` is causal with
right padding; that is the place to add it (and to test it on a GPU).

Attention over a KV cache (``cached_attention``) reads only a prefix of the
``S`` slots. Slot ``s`` is visible only once written (``s < index + T``), so
the slots past the write position hold probability exactly 0; a decode
step at position ``i`` of a cache sized for a long response would
otherwise read all ``S`` slots of every layer (at 8k-token RL responses
most of them empty, and the KV reads are what bounds decoding on an
accelerator). The prefix is one of a few static lengths (``cache_spans``),
the smallest that covers ``index + T``, chosen with ``lax.switch``: shapes
stay static, and a step reads at most one span step (``S / 8``) more than
it needs. The numbers equal whole-cache attention up to float32 summation
order. This runs on CPU and TPU, which branch on the device; on GPU, XLA
executes a conditional by copying the branch index to the host and waiting,
a host round trip per layer and decode step, so there the whole cache is
read (a length-aware decode kernel would be the GPU's way to the same end).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

# float32 min, not -inf: see the module docstring.
MASK_VALUE = float(np.finfo(np.float32).min)


def _attend(q: jax.Array, keys: jax.Array, vals: jax.Array, mask: jax.Array) -> jax.Array:
  """``q [B, T, K, G, N]``, ``keys/vals [B, S, K, N]``, bool ``mask [B|1, T, S]`` -> ``[B, T, K, G, N]``."""
  n = q.shape[-1]
  scores = jnp.einsum("BTKGN,BSKN->BKGTS", q, keys, preferred_element_type=jnp.float32)
  scores = scores * (n ** -0.5)
  scores = jnp.where(mask[:, None, None, :, :], scores, MASK_VALUE)
  probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
  return jnp.einsum("BKGTS,BSKN->BTKGN", probs, vals)


def _attend_rows(q, keys, vals, mask, start):
  """``_attend`` for the queries ``start .. start + c - 1`` (``c = q.shape[1]``).

  The mask rows are sliced here, inside the checkpointed body, so the backward
  pass keeps the whole mask once rather than a stacked copy of its chunks.
  """
  rows = lax.dynamic_slice_in_dim(mask, start, q.shape[1], axis=1)
  return _attend(q, keys, vals, rows)


_attend_rows_remat = jax.checkpoint(_attend_rows, prevent_cse=False)


def attention(q: jax.Array, keys: jax.Array, vals: jax.Array, mask: jax.Array, *,
              q_chunk: int = 0) -> jax.Array:
  """Masked grouped-query attention (see the module docstring for the math).

  Args:
    q: ``[B, T, H, N]`` queries (RoPE applied), compute dtype.
    keys, vals: ``[B, S, K, N]``, the same dtype; ``H`` a multiple of ``K``.
    mask: bool ``[B, T, S]`` (or ``[1, T, S]``, broadcast over the batch),
      True where query ``t`` may attend key slot ``s``.
    q_chunk: static. ``0`` or ``T <= q_chunk``: whole attention (``[B, H, T, S]``
      scores). Otherwise queries are processed ``q_chunk`` at a time (equal to
      float32 rounding; memory ``q_chunk x S`` instead of ``T x S``, forward
      and backward).

  Returns:
    ``[B, T, H, N]`` in the dtype of ``q``.
  """
  b, t, h, n = q.shape
  k = keys.shape[2]
  if h % k:
    raise ValueError(f"attention: query heads {h} are not a multiple of kv heads {k}")
  if mask.ndim != 3 or mask.shape[1:] != (t, keys.shape[1]) or mask.shape[0] not in (1, b):
    raise ValueError(f"attention: mask must be [{b} or 1, {t}, {keys.shape[1]}], got {mask.shape}")
  q_chunk = int(q_chunk)
  if q_chunk < 0:
    raise ValueError(f"attention: q_chunk must be >= 0, got {q_chunk}")
  qg = q.reshape(b, t, k, h // k, n)  # query head h = kv_head * G + j, as HF's repeat_kv
  if q_chunk == 0 or t <= q_chunk:
    return _attend(qg, keys, vals, mask).reshape(b, t, h, n)

  c = q_chunk
  nc, tail = divmod(t, c)
  # Chunks lead so they are the scan's xs: their cotangents come back stacked,
  # not accumulated into a full-size dq each step.
  qs = jnp.moveaxis(qg[:, :nc * c].reshape(b, nc, c, k, h // k, n), 1, 0)

  def step(_, xs):
    qc, i = xs
    return None, _attend_rows_remat(qc, keys, vals, mask, i * c)

  _, out = lax.scan(step, None, (qs, jnp.arange(nc, dtype=jnp.int32)))
  out = jnp.moveaxis(out, 0, 1).reshape(b, nc * c, k, h // k, n)
  if tail:
    last = _attend_rows_remat(qg[:, nc * c:], keys, vals, mask, jnp.int32(nc * c))
    out = jnp.concatenate([out, last], axis=1)
  return out.reshape(b, t, h, n)


# At most this many static prefix lengths per cache size (one lax.switch
# branch each), each a multiple of _SPAN_ALIGN slots.
_MAX_SPANS = 8
_SPAN_ALIGN = 16


def cache_spans(slots: int) -> tuple[int, ...]:
  """The static prefix lengths ``cached_attention`` chooses among for ``slots`` slots.

  Increasing multiples of a step of ``ceil(slots / 8)`` rounded up to 16
  slots, ending at ``slots``: e.g. 80 slots -> (16, 32, 48, 64, 80), 9216 ->
  (1152, 2304, ..., 9216); 16 slots or fewer -> (slots,).
  """
  step = _SPAN_ALIGN * math.ceil(math.ceil(slots / _MAX_SPANS) / _SPAN_ALIGN)
  return tuple(range(step, slots, step)) + (slots,)


def cached_attention(q: jax.Array, cache_k: jax.Array, cache_v: jax.Array, layer: jax.Array,
                     mask: jax.Array, live: jax.Array, *, q_chunk: int = 0) -> jax.Array:
  """``attention`` of ``q`` over layer ``layer`` of a stacked cache, first ``live`` slots only.

  Args:
    q: ``[B, T, H, N]`` queries, compute dtype.
    cache_k, cache_v: ``[L, B, S, K, N]`` stacked caches (any float dtype;
      cast to ``q``'s).
    layer: int32 scalar, the layer to read.
    mask: bool ``[B | 1, T, S]``; every slot at or past ``live`` must be
      False (it is for a causal cache mask: the queries sit before ``live``).
    live: int32 scalar, the number of slots that can be visible
      (``index + T``).
    q_chunk: as in ``attention``.

  Returns:
    ``[B, T, H, N]``; equal to ``attention`` over all ``S`` slots up to float32
    summation order. The layer's keys and values are sliced inside each
    branch, so only the chosen prefix is read (and, on CPU, copied). On GPU
    all ``S`` slots are read (see the module docstring).
  """
  spans = cache_spans(cache_k.shape[2])

  def over(span):
    def run(q, cache_k, cache_v, layer, mask):
      read = lambda c: lax.dynamic_index_in_dim(c, layer, 0, keepdims=False)[:, :span]  # noqa: E731
      return attention(q, read(cache_k).astype(q.dtype), read(cache_v).astype(q.dtype),
                       mask[..., :span], q_chunk=q_chunk)
    return run

  whole = over(spans[-1])
  if len(spans) == 1:
    return whole(q, cache_k, cache_v, layer, mask)

  def prefix(q, cache_k, cache_v, layer, mask, live):
    which = jnp.sum(jnp.asarray(spans[:-1], jnp.int32) < live)  # smallest span >= live
    return lax.switch(which, [over(s) for s in spans], q, cache_k, cache_v, layer, mask)

  # XLA:GPU runs a conditional by copying its branch index to the host and
  # waiting for it: one host round trip per layer and step. There the whole
  # cache is read, as before; CPU and TPU branch on the device.
  return lax.platform_dependent(q, cache_k, cache_v, layer, mask, live, cpu=prefix, tpu=prefix,
                                default=lambda *a: whole(*a[:-1]))
