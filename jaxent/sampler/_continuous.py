"""Continuous batching: S decode slots, refilled from a host queue as rows finish.

The static sampler (``_sampler.py``) decodes a batch until its longest row
ends, so once most rows are done most of each step's rows idle. Here a fixed
number of slots ``S`` decode together; each slot holds one response at its
own point (its own cache region, write index and RoPE position), and a
finished slot takes the next pending row. Layout of one call
(``B`` prompts, ``n`` samples, ``R = max_new_tokens``, ``P`` the prompt
bucket of the longest prompt)::

  host:    queue of rows i*n + j in order; free slots (all at the start)
  insert:  (jitted, one prompt per call) prefill the prompt [1, P] once,
           copy its cache into up to min(n, S) free slots (the slot's whole
           region: the prompt at 0..P-1, zeros after it), draw each row's
           token 0 and write it to the output buffers
  decode:  (jitted) lax.while_loop of up to K steps over all S slots, one
           token per busy slot per step, written straight into the output
           row of that slot; it returns early once enough slots are free
           and rows are pending (or no slot is busy)
  host:    reads which slots are busy (the one device->host sync per decode
           call) and inserts pending rows into the free ones

A slot's cache region has ``P + R`` entries: the prompt left-padded at
``P-l .. P-1`` (pad entries false in the slot's ``kv_mask``) and response
token ``t`` at ``P + t``; the slot's write index is ``P + t`` (a per-row
``KVCache.index``) and its RoPE position ``l + t``, so a row is encoded
exactly as in the static sampler. An insert rewrites the slot's whole region,
so nothing of the previous row's cache stays readable.

Randomness is the static sampler's: row ``r`` draws token ``t`` with
``fold_in(fold_in(key, row_offset + r), t)``, so a row's tokens do not
depend on its slot, on ``S`` or ``K``, or on what else is being decoded
(the logits may differ in the last float32 bits, since the row is computed
in a different batch; see docs/SAMPLER.md).

Shapes depend only on (S, P, R, min(n, S), the padded row count) and the
model config; ``K``, the refill threshold, the prompts and the sampling knobs
are traced, so draining the queue never recompiles.
"""
from __future__ import annotations

import collections
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
from jaxent.sharding import constrain


class SlotState(NamedTuple):
  """The continuous engine's device state (``S`` slots, ``N`` padded output rows)."""
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
  draw_steps: jax.Array  # int32: decode steps (forwards over all S slots)
  slot_steps: jax.Array  # int32: S per decode step, plus each row's first draw at its insert


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
    shards = base.batch_shards(mesh)
    s = -(-self.slots // shards) * shards
    p = base.Sampler(cfg, prompt_buckets=self.prompt_buckets).prompt_bucket(
        max(len(x) for x in rows_in))
    m = min(n, s)                                   # rows one insert can fill
    total = len(rows_in) * n
    n_out = -(-base._pow2_at_least(total, 1) // shards) * shards  # padded output rows
    spec = _Spec(self, p, r, s, m, n_out)

    prompt_tok = np.zeros((len(rows_in), p), np.int32)
    prompt_mask = np.zeros((len(rows_in), p), bool)
    for i, x in enumerate(rows_in):
      prompt_tok[i, p - len(x):] = x
      prompt_mask[i, p - len(x):] = True
    prompt_pos = np.maximum(np.cumsum(prompt_mask, axis=1, dtype=np.int32) - 1, 0)

    scalars = (knobs, key, np.int32(offset))
    if mesh is not None:
      params = base.place_params(cfg, params, mesh)
      scalars = base._replicate(scalars, mesh)
    ctx = jax.set_mesh(mesh) if mesh is not None else _nullcontext()
    with ctx:
      state = _init(spec, scalars[0].pad_id)
      state = _drive(spec, params, state, scalars, prompt_tok, prompt_pos, prompt_mask,
                     row_budget, n, k_steps)
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
  insert_rows: int  # M = min(n, S)
  out_rows: int     # N


def _drive(spec: _Spec, params, state: SlotState, scalars, prompt_tok, prompt_pos, prompt_mask,
           row_budget: np.ndarray, n: int, k_steps: int) -> SlotState:
  """The host loop: insert pending rows into free slots, decode, repeat until all rows end."""
  s, m = spec.slots, spec.insert_rows
  # Longest budget first (ties in row order): a long row started last would
  # decode alone at the end. A prompt's rows share a budget unless per-row
  # budgets are given, so they stay together and share a prefill. The order
  # changes no token: a row's draws depend on its id, not on when it runs.
  order = sorted(range(len(row_budget)), key=lambda x: (-int(row_budget[x]), x))
  pending = collections.deque(order)
  free = list(range(s))
  while True:
    while pending and free:
      # The next prompt's pending rows, as many as fit (they share one prefill).
      i = pending[0] // n
      take = []
      while pending and pending[0] // n == i and len(take) < min(m, len(free)):
        take.append(pending.popleft())
      dest = np.full((m,), s, np.int32)             # s: no slot (the write is dropped)
      rows = np.full((m,), spec.out_rows, np.int32)  # out_rows: no output row
      budget = np.ones((m,), np.int32)
      dest[:len(take)] = free[:len(take)]
      rows[:len(take)] = take
      budget[:len(take)] = row_budget[take]
      del free[:len(take)]
      state = _insert(spec, params, state, prompt_tok[i:i + 1], prompt_pos[i:i + 1],
                      prompt_mask[i:i + 1], dest, rows, budget, *scalars)
    # Return to the host once enough slots are free to be worth a refill: a
    # sixteenth of the slots (at least one), or what is left of the queue.
    refill_at = min(max(1, s // 16), len(pending)) if pending else s + 1
    state = _decode(spec, params, state, np.int32(k_steps), np.int32(refill_at), *scalars)
    busy = np.asarray(jax.device_get(state.busy))   # host sync: which slots are free
    free = [int(x) for x in np.flatnonzero(~busy)]
    if not pending and not busy.any():
      return state


@functools.partial(jax.jit, static_argnums=0)
def _init(spec: _Spec, pad_id) -> SlotState:
  """Empty slots and output buffers (every output entry ``pad_id``, mask 0)."""
  base.TRACE_COUNTS["continuous_init"] += 1
  cfg, s, n_out, r = spec.sampler.config, spec.slots, spec.out_rows, spec.resp_len
  width = spec.prompt_len + r
  cache = models.init_cache(cfg, s, width, dtype=spec.sampler.cache_dtype)
  cache = base.cache_constrained(cfg, cache._replace(index=jnp.zeros((s,), jnp.int32)))
  rows = lambda x: constrain(x, ("batch",) + (None,) * (x.ndim - 1))  # noqa: E731
  z = lambda dt, fill=0: rows(jnp.full((s,), fill, dt))  # noqa: E731
  return SlotState(
      cache=cache, kv_mask=rows(jnp.zeros((s, width), bool)), busy=z(bool), row=z(jnp.int32, n_out),
      t=z(jnp.int32), budget=z(jnp.int32, 1), last=z(jnp.int32), position=z(jnp.int32),
      tokens=rows(jnp.full((n_out, r), pad_id, jnp.int32)),
      logprobs=rows(jnp.zeros((n_out, r), jnp.float32)),
      policy_logprobs=rows(jnp.zeros((n_out, r), jnp.float32)),
      mask=rows(jnp.zeros((n_out, r), jnp.int32)),
      draw_steps=jnp.zeros((), jnp.int32), slot_steps=jnp.zeros((), jnp.int32))


def _write(state: SlotState, out_row, col, tok, lp, plp, keep, knobs) -> SlotState:
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
def _insert(spec: _Spec, params, state: SlotState, tokens, positions, prompt_mask, dest, rows,
            budget, knobs, key, row_offset) -> SlotState:
  """Prefills one prompt ``[1, P]`` and places it in slots ``dest`` (``S``: none) as ``rows``."""
  base.TRACE_COUNTS["continuous_insert"] += 1
  cfg, p, r, m = spec.sampler.config, spec.prompt_len, spec.resp_len, spec.insert_rows
  cache = models.init_cache(cfg, 1, p, dtype=spec.sampler.cache_dtype)
  (hidden, kernel), cache = models.apply(cfg, params, tokens, positions, cache=cache,
                                         kv_mask=prompt_mask, return_hidden=True)
  # float32 accumulation as in models.apply; only the last position's logits.
  logits = jnp.einsum("BD,DV->BV", hidden[:, -1], kernel, preferred_element_type=jnp.float32)
  logits = jnp.broadcast_to(logits, (m, logits.shape[-1]))
  keys = base.step_keys(base.row_keys(key, row_offset + rows), jnp.zeros((m,), jnp.int32))
  tok, lp, plp = base.draw(logits, keys, knobs)

  # The slot's whole region: the prompt's entries, then zeros (no stale values).
  def region(c):
    c = jnp.pad(c, ((0, 0), (0, 0), (0, r), (0, 0), (0, 0)))
    return jnp.broadcast_to(c, (c.shape[0], m) + c.shape[2:])

  sc = state.cache
  k = sc.k.at[:, dest].set(region(cache.k).astype(sc.k.dtype), mode="drop")
  v = sc.v.at[:, dest].set(region(cache.v).astype(sc.v.dtype), mode="drop")
  index = sc.index.at[dest].set(p, mode="drop")
  kv_row = jnp.concatenate([prompt_mask[0], jnp.ones((r,), bool)])
  put = lambda buf, val: buf.at[dest].set(val, mode="drop")  # noqa: E731
  live = dest < spec.slots
  state = state._replace(
      cache=base.cache_constrained(cfg, sc._replace(k=k, v=v, index=index)),
      kv_mask=put(state.kv_mask, jnp.broadcast_to(kv_row, (m, p + r))),
      busy=put(state.busy, ~_is_eos(tok, knobs) & (budget > 1)),
      row=put(state.row, rows), t=put(state.t, jnp.ones((m,), jnp.int32)),
      budget=put(state.budget, budget), last=put(state.last, tok),
      position=put(state.position, jnp.broadcast_to(positions[0, -1] + 1, (m,))),
      slot_steps=state.slot_steps + jnp.sum(live, dtype=jnp.int32))
  return _write(state, rows, jnp.zeros((m,), jnp.int32), tok, lp, plp, live, knobs)


@functools.partial(jax.jit, static_argnums=0, donate_argnums=2)
def _decode(spec: _Spec, params, state: SlotState, max_steps, refill_at, knobs, key,
            row_offset) -> SlotState:
  """Up to ``max_steps`` decode steps over all slots; stops early once ``refill_at`` slots are free."""
  base.TRACE_COUNTS["continuous_decode"] += 1
  cfg, s, r = spec.sampler.config, spec.slots, spec.resp_len

  def cond(c):
    i, st = c
    return (i < max_steps) & jnp.any(st.busy) & (jnp.sum(~st.busy) < refill_at)

  def body(c):
    i, st = c
    logits, cache = models.apply(cfg, params, st.last[:, None], st.position[:, None],
                                 cache=st.cache, kv_mask=st.kv_mask)
    keys = base.step_keys(base.row_keys(key, row_offset + st.row), st.t)
    tok, lp, plp = base.draw(logits[:, 0], keys, knobs)
    alive = st.busy
    st = _write(st, st.row, jnp.minimum(st.t, r - 1), tok, lp, plp, alive, knobs)
    step = alive.astype(jnp.int32)
    st = st._replace(
        cache=base.cache_constrained(cfg, cache._replace(index=st.cache.index + step)),
        busy=alive & ~_is_eos(tok, knobs) & (st.t + 1 < st.budget),
        t=st.t + step, last=jnp.where(alive, tok, st.last), position=st.position + step,
        draw_steps=st.draw_steps + 1, slot_steps=st.slot_steps + s)
    return i + 1, st

  _, state = lax.while_loop(cond, body, (jnp.zeros((), jnp.int32), state))
  return state
