"""The generation engine behind the rollout layer: a small Protocol and its drivers.

An engine turns prompts into sampled responses on the device: ``n`` samples
per prompt, under the decoding settings of a :class:`Decoding`, with an
explicit key. The training loop, the held-out evaluation and ``jaxent eval``
call engines only through :func:`generate_calls`, so a second engine (a
continuous-batching sampler, a serving engine) changes nothing above this
module. :class:`SamplerEngine` (``jaxent.sampler``'s static prefill + decode
loop) is the first implementation; ``VLLMEngine`` (``_vllm.py``, optional
package ``vllm``) the second.

An engine whose weights live outside the JAX params (a serving engine) also
has ``sync(model) -> seconds``: the training loop calls
:func:`sync_engine` after each update, which is a no-op for engines without
it (the native engines read the params at every call).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Iterator, NamedTuple, Protocol, Sequence

import jax
import numpy as np

from jaxent import sampler, sharding
from jaxent.config import check_decoding


@dataclasses.dataclass(frozen=True)
class Decoding:
  """How responses are sampled. Validated on construction (``config.check_decoding``)."""
  max_new_tokens: int                     # R, the response budget in tokens
  temperature: float = 1.0                # T; 0 is greedy
  top_p: float = 1.0                      # nucleus mass; 1 disables
  top_k: int = 0                          # 0 disables
  eos_id: int | tuple[int, ...] | None = None  # a response ends at (and includes) one of these

  def __post_init__(self):
    check_decoding(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
    if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, (int, np.integer)) \
        or self.max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")
    if isinstance(self.eos_id, list):
      object.__setattr__(self, "eos_id", tuple(self.eos_id))


class Generated(NamedTuple):
  """An engine's output for ``P`` prompts x ``n`` samples (device arrays).

  Row ``i * n + j`` is sample ``j`` of prompt ``i``.
  """
  tokens: jax.Array      # int32 [P*n, R] sampled tokens (pad after EOS)
  logprobs: jax.Array    # float32 [P*n, R] log-prob of each sampled token under the sampled distribution
  mask: jax.Array        # int32 [P*n, R] 1 up to and including EOS


class Engine(Protocol):
  """Generates ``num_samples`` responses to each prompt with ``model`` (a ``models.Model``).

  ``prompt_bucket`` and ``batch_bucket`` fix the padded prompt length and
  prompt count (None: the engine's own buckets), so that every call of a
  chunked generation shares one compiled program. ``mesh``: the device mesh
  to generate on (rows over ``data x fsdp``), None for one device.
  ``row_offset``: the global id of the call's first row; row ``r`` draws
  with ``fold_in(key, row_offset + r)``, so a chunked generation with one
  key draws the rows of one call.
  """

  def generate(self, model: Any, prompts: Sequence[Sequence[int]], decoding: Decoding, *,
               num_samples: int, key: jax.Array, mesh=None, prompt_bucket: int | None = None,
               batch_bucket: int | None = None, row_offset: int = 0) -> Generated: ...


def sync_engine(engine: Engine, model) -> float | None:
  """Pushes ``model``'s params into ``engine`` if it keeps its own copy (``engine.sync``);
  the seconds it took, or None for an engine that reads the params at every call."""
  fn = getattr(engine, "sync", None)
  return None if fn is None else fn(model)


@dataclasses.dataclass(frozen=True)
class SamplerEngine:
  """``jaxent.sampler.generate`` with one of its engines.

  ``engine="static"``: a jitted prefill and a ``lax.while_loop`` decode per
  call. ``engine="continuous"``: ``slots`` rows decoded together and
  refilled from a queue as rows end, at most ``steps_per_call`` decode steps
  per device call (None: the sampler's defaults). ``compute_dtype``: None
  (the model's) or e.g. ``"bfloat16"``: generate from copies of the weights
  in that dtype (KV cache too) while the trainer keeps its float32 ones.
  """
  engine: str = "static"
  slots: int | None = None
  steps_per_call: int | None = None
  compute_dtype: str | None = None

  def __post_init__(self):
    if self.engine not in sampler.ENGINE_NAMES:
      raise ValueError(f"engine must be one of {sampler.ENGINE_NAMES}, got {self.engine!r}")
    for name in ("slots", "steps_per_call"):
      x = getattr(self, name)
      if x is not None and (isinstance(x, bool) or not isinstance(x, int) or x < 1):
        raise ValueError(f"{name} must be None or an int >= 1, got {x!r}")

  def generate(self, model, prompts, decoding: Decoding, *, num_samples: int, key, mesh=None,
               prompt_bucket: int | None = None, batch_bucket: int | None = None,
               row_offset: int = 0) -> Generated:
    out = sampler.generate(
        model, prompts, max_new_tokens=decoding.max_new_tokens, temperature=decoding.temperature,
        top_p=decoding.top_p, top_k=decoding.top_k, eos_id=decoding.eos_id,
        num_samples=num_samples, key=key, mesh=mesh,
        prompt_buckets=None if prompt_bucket is None else (prompt_bucket,),
        batch_buckets=None if batch_bucket is None else (batch_bucket,),
        engine=self.engine, slots=self.slots, steps_per_call=self.steps_per_call,
        row_offset=row_offset, compute_dtype=self.compute_dtype)
    return Generated(tokens=out.tokens, logprobs=out.logprobs, mask=out.mask)


def _vllm_engine(**kw) -> Engine:
  from jaxent.rollout._vllm import VLLMEngine  # imports vllm only when chosen
  return VLLMEngine(**kw)


ENGINES: dict[str, Callable[..., Engine]] = {
    "static": SamplerEngine,
    "continuous": functools.partial(SamplerEngine, "continuous"),
    "vllm": _vllm_engine,
}


def make_engine(name: str, *, slots: int | None = None, steps_per_call: int | None = None,
                compute_dtype: str | None = None, vllm_dtype: str = "float32",
                vllm_kv_cache_bytes: int = 1 << 30, vllm_max_model_len: int = 0) -> Engine:
  """The engine registered under ``name`` (``rollout.engine`` in the config).

  ``slots`` and ``steps_per_call`` set the continuous engine's S and K
  (None or 0: its defaults); the static engine ignores them.
  ``compute_dtype``: see ``SamplerEngine``. ``vllm_*`` configure the vLLM
  engine (``VLLMEngine``): its dtype, KV cache bytes and max_model_len;
  choosing it without vllm installed raises ``SetupError`` naming the
  package and the extra.
  """
  if name not in ENGINES:
    raise ValueError(f"unknown rollout engine {name!r}; known: {', '.join(sorted(ENGINES))}")
  if name == "static":
    return ENGINES[name](compute_dtype=compute_dtype)
  if name == "vllm":
    return ENGINES[name](dtype=vllm_dtype, kv_cache_bytes=vllm_kv_cache_bytes,
                         max_model_len=vllm_max_model_len)
  return ENGINES[name](slots=slots or None, steps_per_call=steps_per_call or None,
                       compute_dtype=compute_dtype)


def engine_of(ro) -> Engine:
  """The engine a ``config.RolloutConfig`` names, with its settings."""
  return make_engine(ro.engine, slots=ro.slots, steps_per_call=ro.decode_steps_per_call,
                     compute_dtype=ro.compute_dtype,
                     vllm_dtype=ro.vllm_dtype, vllm_kv_cache_bytes=ro.vllm_kv_cache_bytes,
                     vllm_max_model_len=ro.vllm_max_model_len)


class Call(NamedTuple):
  """One engine call of a chunked generation: prompts ``[start, stop)``, sample group ``rep``."""
  index: int   # the call's position in the sequence
  start: int
  stop: int
  rep: int     # which group of ``samples_per_call`` samples of these prompts


class Chunk(NamedTuple):
  """One call's rows on this host (every process holds every row)."""
  call: Call
  tokens: np.ndarray     # int32 [(stop - start) * samples_per_call, R]
  mask: np.ndarray       # int32, same shape
  logprobs: np.ndarray | None = None  # float32, same shape (with_logprobs=True)


def generate_calls(engine: Engine, model, prompts: Sequence[Sequence[int]], decoding: Decoding, *,
                   key_of: Callable[[Call], jax.Array], samples_per_call: int, repeats: int = 1,
                   prompts_per_call: int | None = None, mesh=None,
                   with_logprobs: bool = False,
                   row_offset_of: Callable[[Call], int] | None = None) -> Iterator[Chunk]:
  """The one chunked-generation driver: yields each call's rows on the host, in order.

  With ``prompts_per_call = c``, the prompts go to the engine ``c`` at a time
  (``repeats`` calls of ``samples_per_call`` samples each), so the KV cache
  holds ``c * samples_per_call`` rows; every call is padded to one prompt
  bucket (the longest prompt's, ``sampler.prompt_bucket``) and one batch
  bucket (``c``), so a last, shorter call does not recompile. With None, one
  call per repeat takes every prompt in the engine's own buckets. Call ``c``
  draws with ``key_of(call)`` and, if ``row_offset_of`` is given, passes the
  engine ``row_offset=row_offset_of(call)`` (e.g. ``call.start * n`` with one
  key for every call: the rows do not depend on the chunking).

  Call ``c + 1`` is launched before chunk ``c`` is yielded, so the host's
  work on a chunk (decoding, grading) overlaps the device's next call; each
  call's rows are fetched to the host (a sync) before the next is launched,
  so one call's cache is alive at a time. With several processes every
  process makes the same calls and receives every row. ``with_logprobs``:
  also fetch the engine's log-probs of the sampled tokens.
  """
  n = len(prompts)
  if prompts_per_call is None:
    calls = [Call(r, 0, n, r) for r in range(repeats)]
    p_bucket = b_bucket = None
  else:
    starts = range(0, n, prompts_per_call)
    calls = [Call(i * repeats + r, lo, min(lo + prompts_per_call, n), r)
             for i, lo in enumerate(starts) for r in range(repeats)]
    p_bucket, b_bucket = sampler.prompt_bucket(max(len(p) for p in prompts)), prompts_per_call
  pending = None
  for call in calls:
    offset = {} if row_offset_of is None else dict(row_offset=row_offset_of(call))
    out = engine.generate(model, prompts[call.start:call.stop], decoding,
                          num_samples=samples_per_call, key=key_of(call), mesh=mesh,
                          prompt_bucket=p_bucket, batch_bucket=b_bucket, **offset)
    if pending is not None:
      yield pending
    pending = Chunk(call, sharding.host_array(out.tokens), sharding.host_array(out.mask),  # host sync
                    sharding.host_array(out.logprobs) if with_logprobs else None)
  if pending is not None:
    yield pending
