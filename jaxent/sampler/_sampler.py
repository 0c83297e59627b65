"""On-device generation: a jitted prefill and a jitted decode loop over a KV cache.

Layout of one call (``B`` prompts, ``n = num_samples``, ``R = max_new_tokens``)::

  host:    prompts (ragged lists) -> left-pad to the prompt bucket P, pad the
           batch to the batch bucket Bb (dummy rows, marked done)
  prefill: one forward over [Bb, P] writes cache slots 0..P-1, then the cache,
           the slot mask and the last-position logits are repeated n times
           (row i*n + j is sample j of prompt i) and the first token is drawn
  decode:  lax.while_loop over steps t = 1..R-1, one token per row per step,
           until every row has emitted EOS or reached its budget, or t = R

Randomness is per row: row ``r`` (global id ``row_offset + r``) draws step
``t`` from ``fold_in(fold_in(key, row_offset + r), t)``, so its tokens depend
on the key, its id and its context only, not on the batch, chunk, slot or
process that computes it (``_continuous.py`` draws the same way).

Cache slots: a prompt of length l sits at slots P-l..P-1 (pad slots masked
false in ``kv_mask``), so every row's next token is written at the same slot
``P + t`` and one scalar cache index serves the batch. RoPE positions are per
row, ``slot - (P - l)``, so a left-padded row is encoded exactly as unpadded.

Shapes depend only on (Bb, P, n, R) and the model config; the sampling knobs
(temperature, top-k, top-p, EOS ids, pad id) and the prompts themselves are
traced, so new prompts within the same buckets and new knob values reuse the
compiled programs.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import math
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxent import models
from jaxent.config import check_decoding
from jaxent.sampler._sampling import sample_logits
from jaxent.sharding import BATCH_AXES, LOGICAL_RULES, constrain, logical_to_spec
from jaxent.sharding import put as put_on_mesh

# Counts how often each jitted function is traced (a Python side effect that
# runs only while tracing): a retrace means a recompile, which tests forbid
# for new prompts within a bucket and for new sampling knobs.
TRACE_COUNTS: collections.Counter = collections.Counter()



class SampleOutput(NamedTuple):
  """What ``generate`` returns; rows are ``B * num_samples`` responses.

  Row ``i * num_samples + j`` is sample ``j`` of prompt ``i`` (GRPO groups are
  consecutive blocks of ``num_samples`` rows).
  """
  tokens: jax.Array          # int32 [B*n, R]; pad_id after the end of each response
  logprobs: jax.Array        # float32 [B*n, R]; log pi_trunc of each token (0 past the end)
  mask: jax.Array            # int32 [B*n, R]; 1 up to and including EOS
  lengths: jax.Array         # int32 [B*n]; number of response tokens (sum of mask)
  policy_logprobs: jax.Array | None = None  # float32 [B*n, R]; untruncated policy, on request
  stats: "SampleStats | None" = None          # work done: decode steps, slot-steps, tokens


class SampleStats(NamedTuple):
  """What a generation computed (int32 scalars).

  ``slot_steps`` counts the row draws computed, idle rows included, so
  ``generated_tokens / slot_steps`` is the slot utilisation, at most 1.
  Static engine: ``decode_steps`` counts the draws of the longest row (the
  prefill's included) and every padded row is computed at each. Continuous
  engine: ``decode_steps`` counts the decode loop's steps, each over all S
  slots; ``slot_steps`` adds one per row (padding rows included) for its
  first token, drawn at the prefill.
  """
  decode_steps: jax.Array      # forwards that drew tokens for every row / slot
  slot_steps: jax.Array        # row draws computed (idle rows included)
  generated_tokens: jax.Array  # response tokens kept (sum of mask)


class SamplingParams(NamedTuple):
  """Traced sampling knobs (changing them never recompiles)."""
  temperature: jax.Array  # float32 scalar; <= 0 is greedy
  top_k: jax.Array        # int32 scalar; <= 0 disables
  top_p: jax.Array        # float32 scalar; >= 1 disables
  eos_ids: jax.Array      # int32 [E]; -1 entries never match
  pad_id: jax.Array       # int32 scalar written after the end of a response


class SamplingState(NamedTuple):
  """The decode loop's carry (all rows ``B = Bb * n``)."""
  step: jax.Array             # int32 scalar: next response slot t to fill
  tokens: jax.Array           # int32 [B, R]
  logprobs: jax.Array         # float32 [B, R]
  policy_logprobs: jax.Array  # float32 [B, R]
  mask: jax.Array             # int32 [B, R]
  done: jax.Array             # bool [B]: emitted EOS, reached its budget, or a padding row
  last: jax.Array             # int32 [B]: token fed to the next forward
  position: jax.Array         # int32 [B]: RoPE position of ``last``
  cache: Any                  # models.KVCache with Bb * n rows
  row_keys: jax.Array         # typed PRNG keys [B]: fold_in(key, row id)
  budget: jax.Array           # int32 [B]: the row ends after this many tokens


def row_keys(key: jax.Array, row_ids: jax.Array) -> jax.Array:
  """``fold_in(key, row_id)`` for each row id: the per-row keys of a generation."""
  return jax.vmap(jax.random.fold_in, (None, 0))(key, row_ids)


def step_keys(keys: jax.Array, t: jax.Array) -> jax.Array:
  """``fold_in(keys[r], t[r])``: row ``r``'s key for its response token ``t`` (scalar or ``[B]``)."""
  t = jnp.broadcast_to(jnp.asarray(t, jnp.uint32), keys.shape)
  return jax.vmap(jax.random.fold_in)(keys, t)


def _pow2_at_least(n: int, lo: int) -> int:
  return max(lo, 1 << max(0, (n - 1).bit_length()))


def prompt_bucket(n: int) -> int:
  """Padded prompt length for a longest prompt of ``n`` tokens: the one bucket rule.

  Multiples of 4 up to 64 (short prompts waste little compute on padding),
  powers of two above (few distinct shapes, so few compiles). The sampler
  pads generation to it and the rollout pads the training batch to it.
  """
  if n <= 64:
    return max(4, -(-n // 4) * 4)
  return _pow2_at_least(n, 128)


def _as_buckets(b, name: str) -> tuple[int, ...] | None:
  if b is None:
    return None
  b = tuple(sorted(set(int(x) for x in b)))
  if not b or b[0] <= 0:
    raise ValueError(f"{name} must be a non-empty list of positive ints, got {b}")
  return b


@dataclasses.dataclass(frozen=True)
class Sampler:
  """Generation for one model config; frozen and hashable, so jit treats it as static.

  Attributes:
    config: the ``models.ModelConfig``.
    prompt_buckets: allowed padded prompt lengths P, or None for the rule of
      ``prompt_bucket`` (multiples of 4 to 64, powers of two above). A prompt longer than the largest bucket is an error.
    batch_buckets: allowed padded prompt counts Bb, or None for powers of
      two. On a mesh, Bb is further rounded up to a multiple of the number
      of batch shards (``data * fsdp``).
    cache_dtype: KV cache dtype; None: the model's compute dtype.
  """
  config: Any
  prompt_buckets: tuple[int, ...] | None = None
  batch_buckets: tuple[int, ...] | None = None
  cache_dtype: Any = None

  def __post_init__(self):
    object.__setattr__(self, "prompt_buckets", _as_buckets(self.prompt_buckets, "prompt_buckets"))
    object.__setattr__(self, "batch_buckets", _as_buckets(self.batch_buckets, "batch_buckets"))
    if self.cache_dtype is not None:
      object.__setattr__(self, "cache_dtype", jnp.dtype(self.cache_dtype))

  # ------------------------------------------------------------------ buckets
  def prompt_bucket(self, n: int) -> int:
    """Padded prompt length for a longest prompt of ``n`` tokens."""
    if self.prompt_buckets is None:
      return prompt_bucket(n)
    for b in self.prompt_buckets:
      if b >= n:
        return b
    raise ValueError(f"prompts: the longest prompt has {n} tokens, more than the largest "
                     f"prompt bucket {self.prompt_buckets[-1]}")

  def batch_bucket(self, n: int, multiple: int = 1) -> int:
    """Padded prompt count for ``n`` prompts (a multiple of ``multiple``)."""
    if self.batch_buckets is None:
      b = _pow2_at_least(n, 1)
    else:
      b = next((x for x in self.batch_buckets if x >= n), None)
      if b is None:
        raise ValueError(f"prompts: {n} prompts is more than the largest batch bucket "
                         f"{self.batch_buckets[-1]}")
    return -(-b // multiple) * multiple

  # ------------------------------------------------------------------ generate
  def generate(self, params, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
               key: jax.Array, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
               eos_id: int | Sequence[int] | None = None, num_samples: int = 1,
               pad_id: int = 0, return_policy_logprobs: bool = False,
               mesh: Mesh | None = None, budgets: Sequence[int] | None = None,
               row_offset: int = 0) -> SampleOutput:
    """See ``jaxent.sampler.generate``; ``params`` is the model's parameter pytree."""
    cfg = self.config
    v = cfg.vocab_size
    rows = _check_prompts(prompts, v)
    r = _check_pos_int(max_new_tokens, "max_new_tokens")
    n = _check_pos_int(num_samples, "num_samples")
    knobs = _check_knobs(temperature, top_p, top_k, eos_id, pad_id, v)
    key = _check_key(key)
    row_budget = check_budgets(budgets, len(rows), n, r)
    offset = check_row_offset(row_offset)
    mesh = resolve_mesh(mesh)
    shards = batch_shards(mesh)

    b = len(rows)
    p = self.prompt_bucket(max(len(x) for x in rows))
    bb = self.batch_bucket(b, shards)
    tokens = np.zeros((bb, p), np.int32)
    prompt_mask = np.zeros((bb, p), bool)
    for i, x in enumerate(rows):
      tokens[i, p - len(x):] = x
      prompt_mask[i, p - len(x):] = True
    # Batch-padding rows get a one-token prompt so no row attends to nothing;
    # they start done and never keep the loop alive.
    prompt_mask[b:, -1] = True
    live = np.arange(bb) < b
    positions = np.maximum(np.cumsum(prompt_mask, axis=1, dtype=np.int32) - 1, 0)
    # Padding rows: budget 1 (they start done and draw nothing that is kept).
    budget = np.ones((bb * n,), np.int32)
    budget[:b * n] = row_budget

    host = (tokens, positions, prompt_mask, live, budget)
    scalars = (knobs, key, np.int32(offset))
    if mesh is None:
      host = jax.device_put(host)
      state, kv_mask = _prefill(self, params, *host, *scalars, num_samples=n, max_new_tokens=r)
      state = _decode(self, params, state, kv_mask, knobs)
    else:
      params = place_params(cfg, params, mesh)
      host = [jax.device_put(x, _batch_sharding(mesh, x.ndim)) for x in host]
      scalars = _replicate(scalars, mesh)
      with jax.set_mesh(mesh):
        state, kv_mask = _prefill(self, params, *host, *scalars, num_samples=n,
                                  max_new_tokens=r)
        state = _decode(self, params, state, kv_mask, knobs)

    m = b * n  # drop the batch-padding rows (a static slice)
    lengths = jnp.sum(state.mask[:m], axis=1, dtype=jnp.int32)
    stats = SampleStats(decode_steps=state.step, slot_steps=state.step * (bb * n),
                        generated_tokens=jnp.sum(lengths))
    out = SampleOutput(
        tokens=state.tokens[:m], logprobs=state.logprobs[:m], mask=state.mask[:m],
        lengths=lengths,
        policy_logprobs=state.policy_logprobs[:m] if return_policy_logprobs else None,
        stats=stats)
    return out


ENGINE_NAMES = ("static", "continuous")


def default_slots(rows: int) -> int:
  """The continuous engine's default ``S`` for a call of ``rows`` rows: a quarter.

  RL response lengths are long-tailed, averaging a quarter to two fifths of
  the cap (static utilisation 25-40%), so ``rows / 4`` busy slots drain the
  call's rows in about as many decode steps as a static batch spends on its
  longest row, with a quarter of its cache (measured in docs/BENCHMARKS.md:
  ``S = 16`` of 64 rows, 2.5x the static engine's speed on a 135M model).
  """
  return max(1, -(-int(rows) // 4))


def generate(model, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, key: jax.Array,
             temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
             eos_id: int | Sequence[int] | None = None, num_samples: int = 1,
             return_policy_logprobs: bool = False, mesh: Mesh | None = None, pad_id: int = 0,
             prompt_buckets: Sequence[int] | None = None,
             batch_buckets: Sequence[int] | None = None, cache_dtype=None,
             budgets: Sequence[int] | None = None, engine: str = "static",
             slots: int | None = None, steps_per_call: int | None = None,
             row_offset: int = 0, compute_dtype=None) -> SampleOutput:
  """Samples ``num_samples`` responses for each of ``prompts`` on device.

  For each prompt ``x`` and step ``t`` the next token is drawn as
  ``y_t ~ pi_trunc(. | x, y_<t)``, where with scaled logits ``z = f(x, y_<t) / T``
  ``pi_trunc(a) ∝ exp(z_a) * 1[a in K]`` and ``K`` is the top-k then top-p set
  (Hugging Face ``TopKLogitsWarper`` / ``TopPLogitsWarper`` semantics; see
  ``jaxent.sampler.truncate_logits`` for ties). ``T = 0`` is greedy. Row
  ``r``'s token ``t`` is drawn with the key ``fold_in(fold_in(key, row_offset
  + r), t)`` whatever the engine, so a row's tokens do not depend on the
  batch, chunk or slot that computed it.

  Args:
    model: a ``models.Model`` (``.config``, ``.params``).
    prompts: list of B token-id lists, possibly of different lengths (>= 1).
    max_new_tokens: R, the response length (static: a new value recompiles).
    key: PRNG key.
    temperature: T >= 0 (traced).
    top_p: p in (0, 1] (traced); 1 disables.
    top_k: k >= 0 (traced); 0 disables.
    eos_id: an id or a list of ids that end a response (traced); None: none,
      every response has R tokens.
    num_samples: n responses per prompt, sharing one prefill (static).
    return_policy_logprobs: also return ``log softmax(z)[y_t]``, the
      untruncated temperature-scaled policy (greedy: T taken as 1).
    mesh: a ``("data", "fsdp", "tensor")`` mesh, or None for the mesh set
      by ``jax.set_mesh`` (if any). Rows (slots) are sharded over ``data``
      and ``fsdp``, the KV cache's heads and the parameters per
      ``models.param_logical_axes`` over ``tensor``.
    pad_id: token written after the end of a response.
    prompt_buckets, batch_buckets, cache_dtype: see ``Sampler``
      (``batch_buckets``: the static engine only).
    budgets: optional per-prompt ints in ``[1, R]`` (traced), shared by the
      prompt's samples (a list of ``B * n`` ints sets each row's): a row ends
      after that many tokens if no EOS came first.
    engine: ``"static"`` (one batch decoded until its longest row ends) or
      ``"continuous"`` (``slots`` rows decoded together, refilled from a
      queue as rows end; see ``_continuous.py``).
    slots: the continuous engine's S (default: ``default_slots(B * n)``,
      a quarter of the rows).
    steps_per_call: the continuous engine's K, the most decode steps between
      two returns to the host (default: R).
    row_offset: the global id of row 0 (row ``r``'s key is
      ``fold_in(key, row_offset + r)``): a caller that generates a larger
      batch in chunks passes each chunk's first row to draw what one call
      would.
    compute_dtype: None (the model's) or a float dtype, e.g. ``"bfloat16"``:
      generate from copies of the parameters in that dtype (activations and,
      unless ``cache_dtype`` says otherwise, the KV cache too), while the
      caller keeps its float32 master weights. Logits, sampling and the
      returned log-probs stay float32.

  Returns:
    ``SampleOutput`` with ``B * n`` rows; row ``i * n + j`` is sample ``j`` of
    prompt ``i``. ``tokens [B*n, R]``; ``logprobs [B*n, R]`` the log-prob of
    each token under the distribution it was drawn from (greedy: 0);
    ``mask`` 1 up to and including the first EOS (or the budget);
    ``lengths = mask.sum(1)``; ``policy_logprobs`` or None; ``stats``
    (``SampleStats``). Past the end: tokens ``pad_id``, log-probs 0.
  """
  if engine not in ENGINE_NAMES:
    raise ValueError(f"engine must be one of {ENGINE_NAMES}, got {engine!r}")
  if slots is not None:
    _check_pos_int(slots, "slots")
  if steps_per_call is not None:
    _check_pos_int(steps_per_call, "steps_per_call")
  if compute_dtype is not None:
    model = generation_copy(model, compute_dtype)
  if engine == "continuous":
    from jaxent.sampler._continuous import ContinuousSampler
    if slots is None:
      slots = default_slots(len(prompts) * int(num_samples)) if isinstance(
          num_samples, (int, np.integer)) and not isinstance(num_samples, bool) else 1
    smp = ContinuousSampler(model.config, slots=slots, prompt_buckets=prompt_buckets,
                            cache_dtype=cache_dtype)
    return smp.generate(model.params, prompts, max_new_tokens=max_new_tokens, key=key,
                        temperature=temperature, top_p=top_p, top_k=top_k, eos_id=eos_id,
                        num_samples=num_samples, pad_id=pad_id,
                        return_policy_logprobs=return_policy_logprobs, mesh=mesh,
                        budgets=budgets, row_offset=row_offset, steps_per_call=steps_per_call)
  sampler = Sampler(model.config, prompt_buckets=prompt_buckets, batch_buckets=batch_buckets,
                    cache_dtype=cache_dtype)
  return sampler.generate(model.params, prompts, max_new_tokens=max_new_tokens, key=key,
                          temperature=temperature, top_p=top_p, top_k=top_k, eos_id=eos_id,
                          num_samples=num_samples, pad_id=pad_id,
                          return_policy_logprobs=return_policy_logprobs, mesh=mesh,
                          budgets=budgets, row_offset=row_offset)


class _Weights(NamedTuple):
  config: Any
  params: Any


@functools.partial(jax.jit, static_argnums=1)
def _cast_params(params, dtype):
  return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                      params)


def generation_copy(model, compute_dtype):
  """``model`` with its float parameters cast to ``compute_dtype``, computing in it.

  The config's ``dtype`` and ``param_dtype`` become ``compute_dtype`` (so the
  KV cache defaults to it); ``model`` itself is not changed.
  """
  try:
    dt = jnp.dtype(compute_dtype)
  except TypeError as e:
    raise ValueError(f"compute_dtype must be a float dtype, got {compute_dtype!r}") from e
  if not jnp.issubdtype(dt, jnp.floating):
    raise ValueError(f"compute_dtype must be a float dtype, got {compute_dtype!r}")
  cfg = model.config.replace(dtype=dt, param_dtype=dt)
  return _Weights(cfg, _cast_params(model.params, dt))


# ---------------------------------------------------------------------------- jitted
def _cache_rules(cfg) -> dict:
  """LOGICAL_RULES, with kv heads replicated when ``tensor`` does not divide them."""
  mesh = jax.sharding.get_abstract_mesh()
  rules = dict(LOGICAL_RULES)
  tensor = 1 if mesh.empty else dict(mesh.shape).get("tensor", 1)
  if cfg.num_kv_heads % tensor:
    rules["kv_heads"] = None
  return rules


def _constrain_cache(cfg, cache):
  axes = models.cache_logical_axes(cfg)
  rules = _cache_rules(cfg)
  return jax.tree.map(lambda x, a: constrain(x, a, rules) if a else x, cache, axes,
                      is_leaf=lambda a: isinstance(a, tuple) and all(isinstance(s, str) for s in a))


def _record(state: SamplingState, tok, lp, plp, knobs: SamplingParams) -> SamplingState:
  """Writes step ``t``'s draws; rows already done get ``pad_id`` and log-prob 0."""
  t = state.step
  alive = ~state.done

  def put(buf, val):
    return lax.dynamic_update_slice_in_dim(buf, val[:, None].astype(buf.dtype), t, axis=1)

  is_eos = jnp.any(tok[:, None] == knobs.eos_ids[None, :], axis=1)
  return state._replace(
      step=t + 1,
      tokens=put(state.tokens, jnp.where(alive, tok, knobs.pad_id)),
      logprobs=put(state.logprobs, jnp.where(alive, lp, 0.0)),
      policy_logprobs=put(state.policy_logprobs, jnp.where(alive, plp, 0.0)),
      mask=put(state.mask, alive.astype(jnp.int32)),
      done=state.done | is_eos | (t + 1 >= state.budget),
      last=tok,
      position=state.position + 1)


def draw(logits, keys, knobs: SamplingParams):
  """One token per row from ``logits [B, V]`` with per-row keys ``[B]``."""
  logits = constrain(logits, ("batch", None))  # sampling sorts over the whole vocab
  return sample_logits(logits, keys, knobs.temperature, knobs.top_k, knobs.top_p)


@functools.partial(jax.jit, static_argnums=0, static_argnames=("num_samples", "max_new_tokens"))
def _prefill(sampler: Sampler, params, tokens, positions, prompt_mask, live, budget,
             knobs: SamplingParams, key, row_offset, *, num_samples: int, max_new_tokens: int):
  """Prefill ``[Bb, P]``, repeat n times, draw token 0 -> (SamplingState, kv_mask)."""
  TRACE_COUNTS["prefill"] += 1
  cfg = sampler.config
  bb, p = tokens.shape
  n, r = num_samples, max_new_tokens
  # Response slots are valid for every row; causality hides the future ones.
  kv_mask = jnp.concatenate([prompt_mask, jnp.ones((bb, r), bool)], axis=1)
  kv_mask = constrain(kv_mask, ("batch", None))
  cache = _constrain_cache(cfg, models.init_cache(cfg, bb, p + r, dtype=sampler.cache_dtype))
  (hidden, kernel), cache = models.apply(cfg, params, tokens, positions, cache=cache,
                                         kv_mask=kv_mask, return_hidden=True)
  # Only the last slot's logits are needed: skip the [Bb, P, V] projection.
  # float32 accumulation as in models.apply (log-softmax over a large vocab).
  logits = jnp.einsum("BD,DV->BV", hidden[:, -1], kernel, preferred_element_type=jnp.float32)

  # num_samples responses per prompt share this prefill: row i*n + j <- row i.
  rep = lambda x, axis=0: jnp.repeat(x, n, axis=axis, total_repeat_length=x.shape[axis] * n)  # noqa: E731
  cache = cache._replace(k=rep(cache.k, 1), v=rep(cache.v, 1))
  cache = _constrain_cache(cfg, cache)
  kv_mask = constrain(rep(kv_mask), ("batch", None))
  logits = rep(logits)
  b = bb * n
  state = SamplingState(
      step=jnp.zeros((), jnp.int32),
      tokens=jnp.full((b, r), knobs.pad_id, jnp.int32),
      logprobs=jnp.zeros((b, r), jnp.float32),
      policy_logprobs=jnp.zeros((b, r), jnp.float32),
      mask=jnp.zeros((b, r), jnp.int32),
      done=~rep(live),
      last=jnp.zeros((b,), jnp.int32),
      position=rep(positions[:, -1]),
      cache=cache, row_keys=row_keys(key, row_offset + jnp.arange(b, dtype=jnp.int32)),
      budget=budget)
  rows = lambda x: constrain(x, ("batch",) + (None,) * (x.ndim - 1))  # noqa: E731
  state = state._replace(**{f: rows(getattr(state, f)) for f in (
      "tokens", "logprobs", "policy_logprobs", "mask", "done", "last", "position", "row_keys",
      "budget")})
  tok, lp, plp = draw(logits, step_keys(state.row_keys, state.step), knobs)
  return _record(state, tok, lp, plp, knobs), kv_mask


@functools.partial(jax.jit, static_argnums=0, donate_argnums=2)
def _decode(sampler: Sampler, params, state: SamplingState, kv_mask,
            knobs: SamplingParams) -> SamplingState:
  """``lax.while_loop`` until every row is done or all R tokens are drawn."""
  TRACE_COUNTS["decode"] += 1
  cfg = sampler.config
  r = state.tokens.shape[1]

  def cond(st: SamplingState):
    return (st.step < r) & ~jnp.all(st.done)

  def body(st: SamplingState) -> SamplingState:
    logits, cache = models.apply(cfg, params, st.last[:, None], st.position[:, None],
                                 cache=st.cache, kv_mask=kv_mask)
    tok, lp, plp = draw(logits[:, 0], step_keys(st.row_keys, st.step), knobs)
    st = st._replace(cache=_constrain_cache(cfg, cache))
    return _record(st, tok, lp, plp, knobs)

  return lax.while_loop(cond, body, state)


# ---------------------------------------------------------------------------- host side
def resolve_mesh(mesh: Mesh | None) -> Mesh | None:
  """``mesh``, else the one set by ``jax.set_mesh``; None for no mesh or one device."""
  if mesh is None:
    ambient = jax.sharding.get_mesh()
    mesh = None if ambient is None or ambient.empty else ambient
  if mesh is not None and mesh.size == 1:
    mesh = None
  return mesh


def batch_shards(mesh: Mesh | None) -> int:
  """Row shards of ``mesh``: the product of its batch axes (``data * fsdp``)."""
  return 1 if mesh is None else math.prod(mesh.shape[a] for a in BATCH_AXES if a in mesh.shape)


def check_budgets(budgets, num_prompts: int, num_samples: int, max_new_tokens: int) -> np.ndarray:
  """Per-row budgets int32 ``[B*n]`` from per-prompt (``B``) or per-row (``B*n``) ints.

  None: every row may use ``max_new_tokens``. Each budget is in
  ``[1, max_new_tokens]``; a per-prompt budget is shared by its samples.
  """
  rows = num_prompts * num_samples
  if budgets is None:
    return np.full((rows,), max_new_tokens, np.int32)
  arr = np.asarray(budgets)
  if arr.ndim != 1 or arr.size not in (num_prompts, rows) or not (
      arr.size == 0 or np.issubdtype(arr.dtype, np.integer)):
    raise ValueError(f"budgets must be a list of ints, one per prompt ({num_prompts}) or one per "
                     f"row ({rows}), got {budgets!r}")
  bad = np.flatnonzero((arr < 1) | (arr > max_new_tokens))
  if bad.size:
    i = int(bad[0])
    raise ValueError(f"budgets[{i}] = {int(arr[i])} is outside [1, max_new_tokens = "
                     f"{max_new_tokens}]")
  arr = arr.astype(np.int32)
  return np.repeat(arr, num_samples) if arr.size == num_prompts else arr


def check_row_offset(row_offset) -> int:
  if isinstance(row_offset, bool) or not isinstance(row_offset, (int, np.integer)) \
      or not 0 <= row_offset < 2**31:
    raise ValueError(f"row_offset must be an int in [0, 2**31), got {row_offset!r}")
  return int(row_offset)


def _batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1)))


def _replicate(tree, mesh):
  """``tree`` replicated over ``mesh``; with several processes, every process
  passes the same host value and places its own copies (a buffer on this
  process's device cannot be sent to another process's devices)."""
  sh = NamedSharding(mesh, P())
  return jax.tree.map(lambda x: put_on_mesh(x, sh), tree)


def _place_params(cfg, params, mesh: Mesh):
  """Shards parameters by their logical axes unless they already live on ``mesh``."""
  devices = set(mesh.devices.flat)
  leaves = jax.tree.leaves(params)
  if all(isinstance(x, jax.Array) and x.sharding.device_set == devices for x in leaves):
    return params  # already placed (e.g. by the trainer): keep its layout
  # The trainer's layout (models.param_shardings): the same specs as train_step's.
  return jax.device_put(params, models.param_shardings(cfg, mesh))


def _check_pos_int(x, name: str) -> int:
  if isinstance(x, bool) or not isinstance(x, (int, np.integer)) or x <= 0:
    raise ValueError(f"{name} must be a positive int, got {x!r}")
  return int(x)


def _check_prompts(prompts, vocab_size: int) -> list[list[int]]:
  if isinstance(prompts, np.ndarray) and prompts.ndim == 2:
    prompts = list(prompts)
  if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or not prompts:
    raise ValueError("prompts must be a non-empty list of token-id lists")
  rows = []
  for i, x in enumerate(prompts):
    arr = np.asarray(x)
    if arr.ndim != 1 or arr.size == 0 or not np.issubdtype(arr.dtype, np.integer):
      raise ValueError(f"prompts[{i}] must be a non-empty list of int token ids, got {x!r}")
    if arr.min() < 0 or arr.max() >= vocab_size:
      raise ValueError(f"prompts[{i}] has token ids outside [0, vocab_size={vocab_size})")
    rows.append(arr.astype(np.int32).tolist())
  return rows


def _check_knobs(temperature, top_p, top_k, eos_id, pad_id, vocab_size) -> SamplingParams:
  check_decoding(temperature=temperature, top_p=top_p, top_k=top_k)
  t, p = float(temperature), float(top_p)
  if eos_id is None:
    eos = []
  else:
    eos = [eos_id] if isinstance(eos_id, (int, np.integer)) else list(eos_id)
    if not eos or any(isinstance(e, bool) or not isinstance(e, (int, np.integer))
                      or not 0 <= e < vocab_size for e in eos):
      raise ValueError(f"eos_id must be None, a token id or a list of token ids in "
                       f"[0, {vocab_size}), got {eos_id!r}")
  # Padded with -1 (never a token) to a multiple of 4 ids, so that passing
  # one EOS id or two does not change the shape and recompile.
  pad_eos = [-1] * (-len(eos) % 4 or (4 if not eos else 0))
  if isinstance(pad_id, bool) or not isinstance(pad_id, (int, np.integer)) or pad_id < 0:
    raise ValueError(f"pad_id must be an int >= 0, got {pad_id!r}")
  return SamplingParams(temperature=np.float32(t), top_k=np.int32(min(int(top_k), 2**31 - 1)),
                        top_p=np.float32(p), eos_ids=np.asarray(eos + pad_eos, np.int32),
                        pad_id=np.int32(pad_id))


def _check_key(key) -> jax.Array:
  """A typed PRNG key (raw ``uint32 [2]`` keys are wrapped as threefry keys)."""
  if isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    if key.shape != ():
      raise ValueError(f"key must be a single PRNG key, got shape {key.shape}")
    return key
  arr = jnp.asarray(key) if isinstance(key, (jax.Array, np.ndarray)) else None
  if arr is None or arr.shape != (2,) or arr.dtype != jnp.uint32:
    raise ValueError(f"key must be a PRNG key (jax.random.key(seed)), got {key!r}")
  return jax.random.wrap_key_data(arr)


check_key = _check_key
check_prompts = _check_prompts
check_knobs = _check_knobs
check_pos_int = _check_pos_int
place_params = _place_params
cache_constrained = _constrain_cache
