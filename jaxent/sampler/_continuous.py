"""Continuous batching: S decode slots, refilled on device as rows finish.

The static sampler (``_sampler.py``) decodes a batch until its longest row
ends, so once most rows are done most of each step's rows idle. Here a fixed
number of slots ``S`` decode together; each slot holds one response at its
own point (its own cache region, write index and RoPE position), and a
finished slot takes the next pending row. Layout of one call
(``B`` prompts padded to ``Bp``, ``n`` samples, ``R = max_new_tokens``,
``P`` the prompt bucket of the longest prompt)::

  prefill: (jitted, once) one forward over the prompts [Bp, P], as the
           static engine's; keeps their caches [L, Bp, P, K, N]; draws every
           row's token 0 from its prompt's last logits and writes it to the
           output buffers
  host:    reads which rows ended at token 0 (EOS or budget 1; one sync) and
           queues the others, longest budget first
  decode:  (jitted) lax.while_loop of up to K steps; each step first moves
           the next queued rows into the free slots (a dynamic_update_slice
           of each new slot's region: its prompt's cache at 0..P-1, zeros
           after it), then runs one forward over all S slots and writes
           each busy slot's token straight into its output row
  host:    calls decode again until no slot is busy and the queue is empty
           (one scalar read per call)

A slot's cache region has ``P + R`` entries: the prompt left-padded at
``P-l .. P-1`` (pad entries false in the slot's ``kv_mask``) and response
token ``t`` at ``P + t``; the slot's write index is ``P + t`` (a per-row
``KVCache.index``) and its RoPE position ``l + t``, so a row is encoded
exactly as in the static sampler. A refill rewrites the slot's whole region,
so nothing of the previous row's cache stays readable.

Randomness is the static sampler's: row ``r`` draws token ``t`` with
``fold_in(fold_in(key, row_offset + r), t)``, so a row's tokens do not
depend on its slot, on ``S`` or ``K``, or on what else is being decoded
(the logits may differ in the last float32 bits, since the row is computed
in a different batch; see docs/SAMPLER.md).

Shapes depend only on (S, P, R, Bp, n) and the model config; ``K``, the
queue, the prompts and the sampling knobs are traced, so draining the queue
never recompiles.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh

from jaxent import models
from jaxent.sampler import _sampler as base
from jaxent.sharding import constrain, host_array


class SlotState(NamedTuple):
  """The continuous engine's device state (``S`` slots, ``N = Bp * n`` output rows)."""
  cache: Any            # models.KVCache: k, v [L, S, P+R, K, N]; index int32 [S]
  kv_mask: jax.Array    # bool [S, P+R]: the slot's valid cache entries
  busy: jax.Array       # bool [S]: holds a row that has not ended
  row: jax.Array        # int32 [S]: output row of the slot (N: none)
  t: jax.Array          # int32 [S]: response tokens drawn so far
  budget: jax.Array     # int32 [S]: the row ends after this many tokens
  last: jax.Array       # int32 [S]: token fed to the next forward
  position: jax.Array   # int32 [S]: RoPE position of ``last``
  tokens: jax.Array     # int32 [N, R] output buffers, in row order
  logprobs: jax.Array   # float32 [N, R]
  policy_logprobs: jax.Array  # float32 [N, R]
  mask: jax.Array       # int32 [N, R]
  head: jax.Array       # int32: queue entries already moved into a slot
  draw_steps: jax.Array  # int32: decode steps (forwards over all S slots)
  slot_steps: jax.Array  # int32: S per decode step, plus each row's first draw at the prefill


class Prompts(NamedTuple):
  """The prompts' prefill, read by every refill (``Bp`` padded prompts)."""
  cache_k: jax.Array    # [L, Bp, P, K, N]
  cache_v: jax.Array    # [L, Bp, P, K, N]
  kv_mask: jax.Array    # bool [Bp, P]: the prompt's real entries
  position: jax.Array   # int32 [Bp]: RoPE position of the prompt's last token


@dataclasses.dataclass(frozen=True)
class ContinuousSampler:
  """Continuous-batching generation for one model config; frozen, static under jit.

  Attributes:
    config: the ``models.ModelConfig``.
    slots: S, the number of rows decoded together (on a mesh rounded up to a
      multiple of the row shards ``data * fsdp``).
    prompt_buckets: as ``Sampler.prompt_buckets``.
    cache_dtype: KV cache dtype; None: the model's compute dtype.
  """
  config: Any
  slots: int
  prompt_buckets: tuple[int, ...] | None = None
  cache_dtype: Any = None

  def __post_init__(self):
    base.check_pos_int(self.slots, "slots")
    object.__setattr__(self, "prompt_buckets",
                       base._as_buckets(self.prompt_buckets, "prompt_buckets"))
    if self.cache_dtype is not None:
      object.__setattr__(self, "cache_dtype", jnp.dtype(self.cache_dtype))

  def padded_shape(self, prompts: int, multiple: int = 1) -> tuple[int, int]:
    """``(S, Bp)`` of a call of ``prompts`` prompts: the slots and the padded
    prompt count (the next power of two), each rounded up to a multiple of
    ``multiple`` (the row shards ``data * fsdp``)."""
    s = -(-self.slots // multiple) * multiple
    bp = -(-base._pow2_at_least(prompts, 1) // multiple) * multiple
    return s, bp

  def generate(self, params, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
               key: jax.Array, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
               eos_id: int | Sequence[int] | None = None, num_samples: int = 1,
               pad_id: int = 0, return_policy_logprobs: bool = False,
               mesh: Mesh | None = None, budgets: Sequence[int] | None = None,
               row_offset: int = 0, steps_per_call: int | None = None) -> base.SampleOutput:
    """See ``jaxent.sampler.generate`` (``engine="continuous"``)."""
    cfg = self.config
    rows_in = base.check_prompts(prompts, cfg.vocab_size)
    r = base.check_pos_int(max_new_tokens, "max_new_tokens")
    n = base.check_pos_int(num_samples, "num_samples")
    knobs = base.check_knobs(temperature, top_p, top_k, eos_id, pad_id, cfg.vocab_size)
    key = base.check_key(key)
    row_budget = base.check_budgets(budgets, len(rows_in), n, r)
    offset = base.check_row_offset(row_offset)
    k_steps = r if steps_per_call is None else base.check_pos_int(steps_per_call,
                                                                  "steps_per_call")
    mesh = base.resolve_mesh(mesh)
    p = base.Sampler(cfg, prompt_buckets=self.prompt_buckets).prompt_bucket(
        max(len(x) for x in rows_in))
    b = len(rows_in)
    s, bp = self.padded_shape(b, base.batch_shards(mesh))
    total = b * n
    spec = _Spec(self, p, r, s, bp, n)

    prompt_tok = np.zeros((bp, p), np.int32)
    prompt_mask = np.zeros((bp, p), bool)
    for i, x in enumerate(rows_in):
      prompt_tok[i, p - len(x):] = x
      prompt_mask[i, p - len(x):] = True
    prompt_mask[b:, -1] = True  # padding prompts: one token, so no row attends to nothing
    prompt_pos = np.maximum(np.cumsum(prompt_mask, axis=1, dtype=np.int32) - 1, 0)
    budget = np.ones((bp * n,), np.int32)   # padding rows: budget 1, never queued
    budget[:total] = row_budget

    scalars = (knobs, key, np.int32(offset))
    host = (prompt_tok, prompt_pos, prompt_mask, budget)
    if mesh is not None:
      params = base.place_params(cfg, params, mesh)
      scalars = base._replicate(scalars, mesh)
      host = tuple(jax.device_put(x, base._batch_sharding(mesh, x.ndim)) for x in host)
    ctx = jax.set_mesh(mesh) if mesh is not None else _nullcontext()
    with ctx:
      state = _init(spec, scalars[0].pad_id)
      state, pre, ended = _insert(spec, params, state, *host, *scalars)
      # The queue: rows still going after token 0, longest budget first (ties
      # in row order), so a long row does not start last and decode alone at
      # the end. The order changes no token: a row's draws depend on its id.
      ended = host_array(ended)[:total]  # host sync: rows ended at token 0
      go = np.flatnonzero(~ended)
      order = np.full((bp * n,), bp * n, np.int32)
      order[:go.size] = go[np.lexsort((go, -row_budget[go]))]
      queue = (order, np.int32(go.size), budget)
      if mesh is not None:
        queue = base._replicate(queue, mesh)
      while True:
        state, more = _decode(spec, params, state, pre, *queue, np.int32(k_steps), *scalars)
        if not bool(host_array(more)):  # host sync: one scalar per decode call
          break
    lengths = jnp.sum(state.mask[:total], axis=1, dtype=jnp.int32)
    stats = base.SampleStats(decode_steps=state.draw_steps, slot_steps=state.slot_steps,
                             generated_tokens=jnp.sum(lengths))
    return base.SampleOutput(
        tokens=state.tokens[:total], logprobs=state.logprobs[:total], mask=state.mask[:total],
        lengths=lengths,
        policy_logprobs=state.policy_logprobs[:total] if return_policy_logprobs else None,
        stats=stats)


class _nullcontext:
  def __enter__(self):
    return None

  def __exit__(self, *exc):
    return False


@dataclasses.dataclass(frozen=True)
class _Spec:
  """Static shapes of one continuous generation (hashable: a jit static argument)."""
  sampler: ContinuousSampler
  prompt_len: int   # P
  resp_len: int     # R
  slots: int        # S
  prompts: int      # Bp, padded prompt count
  samples: int      # n; output rows N = Bp * n


@functools.partial(jax.jit, static_argnums=0)
def _init(spec: _Spec, pad_id) -> SlotState:
  """Empty slots and output buffers (every output entry ``pad_id``, mask 0)."""
  base.TRACE_COUNTS["continuous_init"] += 1
  cfg, s, r = spec.sampler.config, spec.slots, spec.resp_len
  n_out = spec.prompts * spec.samples
  width = spec.prompt_len + r
  cache = models.init_cache(cfg, s, width, dtype=spec.sampler.cache_dtype)
  cache = base.cache_constrained(cfg, cache._replace(index=jnp.zeros((s,), jnp.int32)))
  z = lambda dt, fill=0: _rows(jnp.full((s,), fill, dt))  # noqa: E731
  return SlotState(
      cache=cache, kv_mask=_rows(jnp.zeros((s, width), bool)), busy=z(bool),
      row=z(jnp.int32, n_out), t=z(jnp.int32), budget=z(jnp.int32, 1), last=z(jnp.int32),
      position=z(jnp.int32),
      tokens=_rows(jnp.full((n_out, r), pad_id, jnp.int32)),
      logprobs=_rows(jnp.zeros((n_out, r), jnp.float32)),
      policy_logprobs=_rows(jnp.zeros((n_out, r), jnp.float32)),
      mask=_rows(jnp.zeros((n_out, r), jnp.int32)),
      head=jnp.zeros((), jnp.int32), draw_steps=jnp.zeros((), jnp.int32),
      slot_steps=jnp.zeros((), jnp.int32))


def _rows(x):
  return constrain(x, ("batch",) + (None,) * (x.ndim - 1))


def _write(state: SlotState, out_row, col, tok, lp, plp, keep) -> SlotState:
  """Writes each kept draw to output row ``out_row`` at column ``col`` (others dropped)."""
  n_out = state.tokens.shape[0]
  where = jnp.where(keep, out_row, n_out)  # out of range: the scatter drops it
  put = lambda buf, v: buf.at[where, col].set(v.astype(buf.dtype), mode="drop")  # noqa: E731
  return state._replace(tokens=put(state.tokens, tok), logprobs=put(state.logprobs, lp),
                        policy_logprobs=put(state.policy_logprobs, plp),
                        mask=put(state.mask, jnp.ones_like(tok)))


def _is_eos(tok, knobs):
  return jnp.any(tok[:, None] == knobs.eos_ids[None, :], axis=1)


@functools.partial(jax.jit, static_argnums=0, donate_argnums=2)
def _insert(spec: _Spec, params, state: SlotState, tokens, positions, prompt_mask, budget,
            knobs, key, row_offset):
  """Prefills the prompts ``[Bp, P]`` once and draws every row's token 0.

  Returns ``(state, Prompts, ended)``: the state with column 0 of every real
  row written, the prompts' caches for the refills, and bool ``[N]``, the
  rows that ended at token 0 (EOS or budget 1; padding rows too).
  """
  base.TRACE_COUNTS["continuous_insert"] += 1
  cfg, p, n = spec.sampler.config, spec.prompt_len, spec.samples
  n_out = spec.prompts * n
  cache = base.cache_constrained(
      cfg, models.init_cache(cfg, spec.prompts, p, dtype=spec.sampler.cache_dtype))
  (hidden, kernel), cache = models.apply(cfg, params, tokens, positions, cache=cache,
                                         kv_mask=prompt_mask, return_hidden=True)
  # float32 accumulation as in models.apply; only the last position's logits,
  # shared by the prompt's n rows (row i*n + j <- prompt i).
  logits = jnp.einsum("BD,DV->BV", hidden[:, -1], kernel, preferred_element_type=jnp.float32)
  logits = jnp.repeat(logits, n, axis=0, total_repeat_length=n_out)
  rows = jnp.arange(n_out, dtype=jnp.int32)
  keys = base.step_keys(base.row_keys(key, row_offset + rows), jnp.zeros((n_out,), jnp.int32))
  tok, lp, plp = base.draw(logits, keys, knobs)
  ended = _is_eos(tok, knobs) | (budget <= 1)
  # Padding rows are written too (sliced off by the caller) and counted as computed draws.
  state = _write(state, rows, jnp.zeros((n_out,), jnp.int32), tok, lp, plp,
                 jnp.ones((n_out,), bool))
  state = state._replace(slot_steps=state.slot_steps + n_out)
  pre = Prompts(cache_k=cache.k, cache_v=cache.v, kv_mask=prompt_mask,
                position=positions[:, -1])
  return state, pre, ended


@functools.partial(jax.jit, static_argnums=0, donate_argnums=2)
def _decode(spec: _Spec, params, state: SlotState, pre: Prompts, order, queued, budgets,
            max_steps, knobs, key, row_offset):
  """Up to ``max_steps`` steps: refill free slots from ``order[head:queued]``, decode all slots.

  Returns ``(state, more)``: ``more`` is True while a slot is busy or rows are queued.
  """
  base.TRACE_COUNTS["continuous_decode"] += 1
  cfg, s, r, p, n = (spec.sampler.config, spec.slots, spec.resp_len, spec.prompt_len,
                     spec.samples)
  n_out = spec.prompts * n

  def refill(st: SlotState) -> SlotState:
    free = ~st.busy
    rank = jnp.cumsum(free, dtype=jnp.int32) - 1
    at = st.head + rank
    take = free & (at < queued)
    new_row = jnp.where(take, order[jnp.minimum(at, n_out - 1)], st.row)
    prompt = jnp.minimum(new_row, n_out - 1) // n
    count = jnp.sum(take, dtype=jnp.int32)
    # The taken slots first (nonzero keeps slot order); only `count` are written.
    dest = jnp.nonzero(take, size=s, fill_value=0)[0].astype(jnp.int32)

    def put(j, kv):
      slot = dest[j]
      src = prompt[slot]
      out = []
      for c, pc in zip(kv, (pre.cache_k, pre.cache_v)):
        region = lax.dynamic_slice_in_dim(pc, src, 1, axis=1).astype(c.dtype)
        region = jnp.pad(region, ((0, 0), (0, 0), (0, r), (0, 0), (0, 0)))
        out.append(lax.dynamic_update_slice(c, region, (0, slot, 0, 0, 0)))
      return tuple(out)

    k, v = lax.fori_loop(0, count, put, (st.cache.k, st.cache.v))
    kv_row = jnp.concatenate([pre.kv_mask[prompt], jnp.ones((s, r), bool)], axis=1)
    new = lambda val, old: jnp.where(take.reshape((s,) + (1,) * (old.ndim - 1)), val, old)  # noqa: E731
    first = st.tokens[jnp.minimum(new_row, n_out - 1), 0]
    return st._replace(
        cache=base.cache_constrained(cfg, st.cache._replace(
            k=k, v=v, index=new(jnp.full((s,), p, jnp.int32), st.cache.index))),
        kv_mask=new(kv_row, st.kv_mask), busy=st.busy | take, row=new_row,
        t=new(jnp.ones((s,), jnp.int32), st.t), budget=new(budgets[new_row % n_out], st.budget),
        last=new(first, st.last), position=new(pre.position[prompt] + 1, st.position),
        head=st.head + count)

  def pending(st):
    return jnp.any(st.busy) | (st.head < queued)

  def cond(c):
    i, st = c
    return (i < max_steps) & pending(st)

  def body(c):
    i, st = c
    st = refill(st)
    logits, cache = models.apply(cfg, params, st.last[:, None], st.position[:, None],
                                 cache=st.cache, kv_mask=st.kv_mask)
    keys = base.step_keys(base.row_keys(key, row_offset + st.row), st.t)
    tok, lp, plp = base.draw(logits[:, 0], keys, knobs)
    alive = st.busy
    st = _write(st, st.row, jnp.minimum(st.t, r - 1), tok, lp, plp, alive)
    step = alive.astype(jnp.int32)
    st = st._replace(
        cache=base.cache_constrained(cfg, cache._replace(index=st.cache.index + step)),
        busy=alive & ~_is_eos(tok, knobs) & (st.t + 1 < st.budget),
        t=st.t + step, last=jnp.where(alive, tok, st.last), position=st.position + step,
        draw_steps=st.draw_steps + 1, slot_steps=st.slot_steps + s)
    return i + 1, st

  _, state = lax.while_loop(cond, body, (jnp.zeros((), jnp.int32), state))
  return state, pending(state)
