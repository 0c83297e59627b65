"""One RL step's rollout: prompts -> engine -> responses -> rewards -> advantages -> Batch.

``collect`` does all of it, including DAPO dynamic sampling (more batches of
prompts until enough groups have unequal rewards) and the multi-host gather
(every process generates every row, grades its own prompts' responses, and
the rewards are gathered so all processes take the same decisions). It
returns one typed record, :class:`Rollout`.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple, Protocol, Sequence

import jax
import numpy as np

from jaxent import sharding
from jaxent.config import RolloutConfig
from jaxent.rollout._engine import Decoding, Engine, generate_calls
from jaxent.rollout._rollout import RolloutStats, assemble, selected_rows, uniform_groups
from jaxent.types import Batch


class PromptSource(Protocol):
  """An iterator of prompt batches whose position can be saved and restored."""
  def __next__(self) -> tuple[list[list[int]], list[str]]: ...
  def get_state(self) -> dict: ...
  def set_state(self, state: dict) -> None: ...


class Graded(Protocol):
  """What a grader returns for a batch of responses (``rewards.GradeResult``)."""
  rewards: np.ndarray
  def counters(self) -> dict: ...


Grader = Callable[[list[str], list[str]], Graded]  # (responses, gold answers) -> rewards


@dataclasses.dataclass(frozen=True)
class Task:
  """What a rollout needs besides the policy: text in and out, and how it is scored."""
  decode: Callable[[Sequence[int]], str]   # response token ids -> text
  grade: Grader
  pad_id: int
  eos_id: int | None


class Rollout(NamedTuple):
  """One step's rollout, on the host."""
  batch: Batch                      # old/ref log-probs still zero (filled by the trainer's forward)
  stats: RolloutStats
  gen_batches: int                  # generation batches drawn (DAPO refill)
  reward_counters: dict             # grader counters summed over processes and batches


class _Generation(NamedTuple):
  prompts: list[list[int]]
  tokens: np.ndarray
  logprobs: np.ndarray
  mask: np.ndarray
  rewards: np.ndarray
  counters: dict


def decoding_of(ro: RolloutConfig, eos_id) -> Decoding:
  """The rollout's decoding settings."""
  return Decoding(max_new_tokens=ro.max_new_tokens, temperature=ro.temperature, top_p=ro.top_p,
                  top_k=ro.top_k, eos_id=eos_id)


def generate(engine: Engine, model, prompts: list[list[int]], ro: RolloutConfig, *, eos_id, key,
             mesh=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """``n = ro.samples_per_prompt`` responses to each prompt: (tokens, logprobs, mask) on this host.

  ``logprobs`` are the engine's log-probs of the sampled tokens under the
  distribution they were drawn from (0 past the end).

  Row ``i * n + j`` is sample ``j`` of prompt ``i`` (GRPO groups stay whole and
  consecutive); ``[len(prompts) * n, R]`` each.

  With ``c = ro.prompts_per_generate`` and ``0 < c < len(prompts)``, the
  engine gets the prompts ``c`` at a time (``generate_calls``), so its KV
  cache holds ``c * n`` rows, and every chunk has one shape. Every chunk
  draws with ``key`` and passes its first row's id as ``row_offset``, so
  row ``r`` draws with ``fold_in(key, r)`` whatever the chunking: the rows
  are those of one unchunked call (up to the last float32 bits of logits
  computed in another batch, which can flip a float near-tie).
  """
  c = ro.prompts_per_generate
  n = ro.samples_per_prompt
  chunked = 0 < c < len(prompts)
  chunks = list(generate_calls(
      engine, model, prompts, decoding_of(ro, eos_id), samples_per_call=n,
      key_of=lambda _: key, row_offset_of=lambda call: call.start * n,
      prompts_per_call=c if chunked else None, mesh=mesh, with_logprobs=True))
  return tuple(np.concatenate([getattr(x, f) for x in chunks])
               for f in ("tokens", "logprobs", "mask"))


def _responses_text(tokens: np.ndarray, mask: np.ndarray, decode) -> list[str]:
  """Decodes each response up to and including its EOS (the decoder decides what to show)."""
  return [decode([int(t) for t in row[m > 0]]) for row, m in zip(tokens, mask)]


def _generate_and_grade(engine, model, source: PromptSource, task: Task, ro: RolloutConfig, key,
                        mesh) -> _Generation:
  """One generation batch: the next ``prompts_per_step`` prompts, their responses and rewards.

  Every row of every process: prompts and rewards are gathered, so all
  processes take the same refill decisions.
  """
  local_prompts, answers = next(source)
  prompts = sharding.gather_prompts(local_prompts)  # this process's prompts -> all of them
  toks, lps, mask = generate(engine, model, prompts, ro, eos_id=task.eos_id, key=key, mesh=mesh)
  # Each process grades the responses to its own prompts (it holds their answers).
  n_local = len(local_prompts) * ro.samples_per_prompt
  proc = jax.process_index()
  mine = slice(proc * n_local, (proc + 1) * n_local) if jax.process_count() > 1 else slice(None)
  texts = _responses_text(toks[mine], mask[mine], task.decode)
  graded = task.grade(texts, [a for a in answers for _ in range(ro.samples_per_prompt)])
  rewards = sharding.gather_rows(np.asarray(graded.rewards))
  return _Generation(prompts, toks, lps, mask, rewards, sharding.sum_counters(graded.counters()))


def _add_counters(total: dict, more: dict) -> dict:
  """Counts add up over the generation batches; other values keep the latest."""
  out = dict(total)
  for name, count in more.items():
    numeric = isinstance(count, (int, float, np.number))
    out[name] = out.get(name, 0) + count if numeric else count
  return out


def collect(engine: Engine, model, source: PromptSource, task: Task, ro: RolloutConfig, *,
            key: jax.Array, mesh=None) -> Rollout:
  """One step's rollout with ``model`` (a ``models.Model``) on ``mesh``.

  With ``ro.filter_groups``, DAPO dynamic sampling: up to ``ro.max_gen_batches``
  generation batches until ``prompts_per_step`` groups have unequal rewards;
  batch 0 draws with ``key`` itself (a run without refills draws as one
  without the option), batch ``g`` with ``fold_in(key, g)``; the first
  ``prompts_per_step`` such groups are kept in generation order
  (``select_groups``) and all-equal groups fill a shortfall, masked.
  """
  n = ro.samples_per_prompt
  gens, kept = [], 0
  for g in range(ro.max_gen_batches):
    key_g = key if g == 0 else jax.random.fold_in(key, g)
    gens.append(_generate_and_grade(engine, model, source, task, ro, key_g, mesh))
    kept += int(np.sum(~uniform_groups(gens[-1].rewards, n)))
    if not ro.filter_groups or kept >= ro.prompts_per_step:
      break
  cat = lambda f: np.concatenate([getattr(x, f) for x in gens])  # noqa: E731
  rewards = cat("rewards")
  groups, rows, _ = selected_rows(rewards, num_groups=ro.prompts_per_step, samples_per_prompt=n)
  prompts = [p for x in gens for p in x.prompts]
  counters = {}
  for x in gens:
    counters = _add_counters(counters, x.counters)
  batch, stats = assemble([prompts[i] for i in groups], cat("tokens")[rows], cat("mask")[rows],
                          rewards[rows], pad_id=task.pad_id, samples_per_prompt=n,
                          eos_id=task.eos_id, scale_by_std=ro.scale_by_std,
                          filter_groups=ro.filter_groups, rollout_log_prob=cat("logprobs")[rows])
  return Rollout(batch=batch, stats=stats, gen_batches=len(gens), reward_counters=counters)
