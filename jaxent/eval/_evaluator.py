"""The one evaluator: ``k`` samples per prompt, graded; for training and for ``jaxent eval``.

``sample_and_grade`` generates through the rollout layer's chunked driver
(``rollout.generate_calls``: bounded KV cache, one compiled program per
benchmark, grading of call ``c`` overlapped with generation of call ``c +
1``) and grades with any grader (``rewards.grade_batch`` or the training
task's). ``heldout_metrics`` is the training loop's held-out evaluation;
``evaluate_benchmark`` the report of ``jaxent eval``.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable, NamedTuple, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from jaxent import data as data_lib
from jaxent import rewards, rollout, sharding
from jaxent.eval._benchmarks import Benchmark, resolve_benchmark, resolve_fields
from jaxent.eval._metrics import accuracy, mean_at_k, pass_at_k
from jaxent.eval._settings import _is_int
from jaxent.types import MESH_AXES

# Rows per sampler call and row shard (data x fsdp) when no batch size is given.
DEFAULT_ROWS_PER_SHARD = 64


class Samples(NamedTuple):
  """``k`` graded samples of each of ``N`` prompts (sample ``j`` of prompt ``i`` at ``[i, j]``)."""
  rewards: np.ndarray         # float32 [N, k]
  lengths: np.ndarray         # int32 [N, k] response tokens, EOS included
  finished: np.ndarray        # bool [N, k] ended with EOS (not truncated at max_new_tokens)
  texts: list[list[str]]      # the decoded responses
  failures: int               # grader failures (scored 0)
  timeouts: int               # grader timeouts (scored 0)


def samples_per_call(k: int, rows: int) -> int:
  """The largest divisor of ``k`` that is <= ``rows``.

  When one prompt's ``k`` samples exceed the row budget they are drawn in
  ``k / d`` equal calls of ``d`` samples: equal calls share one compiled
  program (``num_samples`` is static in the sampler).
  """
  return max(d for d in range(1, min(k, rows) + 1) if k % d == 0)


def sample_and_grade(engine: rollout.Engine, model, prompts: Sequence[Sequence[int]],
                     answers: Sequence[str], decoding: rollout.Decoding, *, k: int,
                     grade: rollout.Grader, decode: Callable[[Sequence[int]], str], key: jax.Array,
                     batch_size: int, mesh: Mesh | None = None, grade_here: bool = True
                     ) -> Samples | None:
  """``k`` samples of each prompt, ``batch_size`` rows per engine call, graded against ``answers``.

  Call ``(start, rep)`` (prompts from ``start``, sample group ``rep``) draws
  with ``fold_in(fold_in(key, start), rep)``: results depend on the seed and
  ``batch_size``, not on the mesh. ``grade_here=False`` (processes other than
  the grading one) generates only and returns None.
  """
  n = len(prompts)
  per_call = samples_per_call(k, batch_size)
  prompts_per_call = min(n, max(1, batch_size // per_call))
  eos = decoding.eos_id
  eos = [] if eos is None else list(eos) if isinstance(eos, tuple) else [eos]
  rew = np.zeros((n, k), np.float32)
  lengths = np.zeros((n, k), np.int32)
  finished = np.zeros((n, k), bool)
  texts_all: list[list[str | None]] = [[None] * k for _ in range(n)]
  fails = timeouts = 0
  chunks = rollout.generate_calls(
      engine, model, prompts, decoding, samples_per_call=per_call, repeats=k // per_call,
      prompts_per_call=prompts_per_call, mesh=mesh,
      key_of=lambda c: jax.random.fold_in(jax.random.fold_in(key, c.start), c.rep))
  for chunk in chunks:
    if not grade_here:
      continue
    i, b, toks, mask = chunk.call.start, chunk.call.stop - chunk.call.start, chunk.tokens, chunk.mask
    texts = [decode([int(t) for t in row[m > 0]]) for row, m in zip(toks, mask)]
    res = grade(texts, [a for a in answers[i:i + b] for _ in range(per_call)])
    cols = slice(chunk.call.rep * per_call, (chunk.call.rep + 1) * per_call)
    rew[i:i + b, cols] = np.asarray(res.rewards).reshape(b, per_call)
    ln = mask.sum(axis=1)
    lengths[i:i + b, cols] = ln.reshape(b, per_call)
    last = toks[np.arange(len(toks)), np.maximum(ln - 1, 0)]
    finished[i:i + b, cols] = ((ln > 0) & np.isin(last, eos if eos else [-1])).reshape(b, per_call)
    for j, text in enumerate(texts):
      texts_all[i + j // per_call][chunk.call.rep * per_call + j % per_call] = text
    fails += res.failures
    timeouts += res.timeouts
  if not grade_here:
    return None
  return Samples(rew, lengths, finished, texts_all, int(fails), int(timeouts))


def heldout_metrics(engine: rollout.Engine, model, prompts, answers, *, task: rollout.Task,
                    max_new_tokens: int, key, batch_size: int, mesh=None) -> dict:
  """The training loop's held-out evaluation: greedy, every prompt once.

  Every process holds the whole held-out set and scores all of it. Returns
  ``eval_reward`` (the mean reward) and ``eval_accuracy`` (the fraction correct).
  """
  decoding = rollout.Decoding(max_new_tokens=max_new_tokens, temperature=0.0, eos_id=task.eos_id)
  s = sample_and_grade(engine, model, prompts, answers, decoding, k=1, grade=task.grade,
                       decode=task.decode, key=key, batch_size=batch_size, mesh=mesh)
  return {"eval_reward": mean_at_k(s.rewards.astype(np.float64)), "eval_accuracy": accuracy(s.rewards)}


def eos_ids(tok, cfg) -> list[int] | None:
  """The tokenizer's EOS and the model config's EOS ids (Qwen2.5 instruct lists two)."""
  ids = [getattr(tok, "eos_token_id", None)]
  cfg_eos = getattr(cfg, "eos_token_id", None)
  ids += list(cfg_eos) if isinstance(cfg_eos, (tuple, list)) else [cfg_eos]
  ids = sorted({int(i) for i in ids if _is_int(i) and 0 <= i < cfg.vocab_size})
  return ids or None


def evaluate_benchmark(model, tok, benchmark: Benchmark | str, *, batch_size: int | None = None,
                       seed: int = 0, timeout_s: float = 5.0, skip_special_tokens: bool = True,
                       return_samples: bool = False, presets: bool = True, mesh: Mesh | None = None,
                       engine: rollout.Engine | None = None,
                       **overrides):
  """mean@k and pass@k of ``model`` on a local JSONL (or Parquet) benchmark.

  Args:
    model: a ``models.Model``.
    tok: its tokenizer.
    benchmark: a ``Benchmark`` from ``resolve_benchmark``, or a spec
      (``NAME=PATH`` or ``PATH``) resolved here with ``overrides`` and
      ``presets``: ``evaluate_benchmark(m, tok, "data/aime24.jsonl")``
      decodes with the AIME preset, ``..., "x.jsonl", k=4, temperature=1.0)``
      with explicit settings.
    batch_size: rows (prompts x samples) per sampler call, over the whole
      mesh (default: ``DEFAULT_ROWS_PER_SHARD`` = 64 per row shard, i.e.
      ``64 x data x fsdp``). It bounds the KV cache, ``rows x (prompt
      bucket + max_new_tokens)`` positions split over ``data x fsdp``:
      mean@32 with 64 rows generates 2 prompts per call; ``k`` above it is
      split into equal calls. Every call is padded to the same prompt bucket
      (the longest prompt's) and the same prompt count, so the last, ragged
      call does not recompile: one compiled prefill and decode per
      benchmark. On a mesh the sampler pads a call's prompts to a multiple
      of ``data x fsdp`` (padding rows cost compute, not results): choose
      ``batch_size`` a multiple of ``data x fsdp x`` the samples per call.
    seed: the sampling key; results are reproducible for a given seed and
      ``batch_size``, on any mesh (the sampler's draws do not depend on the
      layout).
    timeout_s: per-response grading bound.
    skip_special_tokens: decode responses without special tokens.
    return_samples: also return the per-sample records.
    presets, overrides: see ``resolve_benchmark`` (when ``benchmark`` is a spec).
    engine: the generation engine (default: ``rollout.SamplerEngine``).
    mesh: the ``("data", "fsdp", "tensor")`` mesh to generate on (rows over
      ``data x fsdp``, heads over ``tensor``); None: the mesh ``model``'s
      params live on (``load_model_or_run(..., mesh=)``), or one device.
      With several processes (``jax.distributed``) every process calls this
      function (the generation is one program over all devices): the
      responses are gathered to every host, process 0 grades them and
      returns the report; the other processes return None.

  Returns:
    The report: ``benchmark``, ``file``, ``preset``, the settings used
    (``k``, ``temperature``, ``top_p``, ``top_k``, ``max_new_tokens``,
    ``max_prompt_len``, ``reward``, ``prompt_key``, ``answer_key``,
    ``chat_template``, ``seed``, ``batch_size``, ``overrides``, ``mesh``
    ({axis: size}, all 1 on one device), ``processes``),
    ``prompts``, ``samples``, ``mean@k``, ``pass@k``, ``mean_response_len``,
    ``truncated_frac`` (responses that hit ``max_new_tokens`` without EOS),
    ``reward_failures``, ``reward_timeouts``, ``skipped_rows``, ``skipped``
    (counts by reason), ``time_s``. With ``return_samples``, ``(report,
    samples)``: one dict per response (``benchmark``, ``index`` the row's
    0-based line, ``sample``, ``prompt``, ``answer``, ``response``,
    ``reward``, ``length``, ``finished``), prompt by prompt.

  Raises:
    ValueError: bad settings or ``batch_size``; data.DataError: a missing or
      unusable file (named).
  """
  if batch_size is not None and (not _is_int(batch_size) or batch_size < 1):
    raise ValueError(f"batch_size (rows per sampler call) must be an int >= 1, got {batch_size!r}")
  mesh = sharding.mesh_of(model.params) if mesh is None else mesh
  if mesh is not None and mesh.size == 1:
    mesh = None
  shape = {a: 1 for a in MESH_AXES} if mesh is None else {a: int(mesh.shape.get(a, 1)) for a in MESH_AXES}
  if batch_size is None:
    batch_size = DEFAULT_ROWS_PER_SHARD * shape["data"] * shape["fsdp"]
  is_main = jax.process_index() == 0
  if isinstance(benchmark, Benchmark) and overrides:
    raise ValueError(f"overrides {sorted(overrides)} with a resolved Benchmark: give them to "
                     f"resolve_benchmark")
  bench = (benchmark if isinstance(benchmark, Benchmark)
           else resolve_benchmark(benchmark, overrides, presets=presets))
  s = bench.settings
  t0 = time.perf_counter()
  prompt_key, answer_key = resolve_fields(bench.path, s.prompt_keys, s.answer_keys)
  ps = data_lib.load_prompts(bench.path, tok, prompt_key=prompt_key, answer_key=answer_key,
                             max_prompt_len=s.max_prompt_len, chat_template=s.chat_template)
  ex = ps.examples
  n, k, r_len = len(ex), s.k, s.max_new_tokens
  eos = eos_ids(tok, model.config)
  decoding = rollout.Decoding(max_new_tokens=r_len, temperature=s.temperature, top_p=s.top_p,
                              top_k=s.top_k, eos_id=None if eos is None else tuple(eos))
  # With several processes the responses are gathered to every host (every
  # process makes every call) and process 0 grades.
  out = sample_and_grade(
      rollout.SamplerEngine() if engine is None else engine, model,
      [e.prompt_ids.tolist() for e in ex], [e.answer for e in ex], decoding, k=k,
      grade=lambda texts, gold: rewards.grade_batch(s.reward, texts, gold, timeout_s=timeout_s),
      decode=lambda ids: tok.decode(ids, skip_special_tokens=skip_special_tokens),
      key=jax.random.PRNGKey(seed), batch_size=batch_size, mesh=mesh, grade_here=is_main)
  if not is_main:
    return None
  rew, lengths, finished = out.rewards, out.lengths, out.finished

  kinds = {f: v for f, v in dataclasses.asdict(ps.stats).items()
           if v and f not in ("rows", "valid", "truncated")}
  report = {
      "benchmark": bench.name, "file": bench.path, "preset": bench.preset,
      "prompts": n, "k": k, "samples": n * k,
      "temperature": s.temperature, "top_p": s.top_p, "top_k": s.top_k,
      "max_new_tokens": r_len, "max_prompt_len": s.max_prompt_len, "reward": s.reward,
      "prompt_key": prompt_key, "answer_key": answer_key, "chat_template": s.chat_template,
      "seed": seed, "batch_size": batch_size, "overrides": list(bench.overrides),
      "mesh": shape, "processes": jax.process_count(),
      f"mean@{k}": mean_at_k(rew), f"pass@{k}": pass_at_k(rewards.is_correct(rew), k),
      "mean_response_len": float(lengths.mean()),
      "truncated_frac": float((~finished).mean()),
      "reward_failures": out.failures, "reward_timeouts": out.timeouts,
      "skipped_rows": ps.stats.rows - ps.stats.valid, "skipped": kinds,
      "time_s": round(time.perf_counter() - t0, 3),
  }
  if not return_samples:
    return report
  samples = [{"benchmark": bench.name, "index": e.index, "sample": j, "prompt": e.prompt,
              "answer": e.answer, "response": out.texts[i][j], "reward": float(rew[i, j]),
              "length": int(lengths[i, j]), "finished": bool(finished[i, j])}
             for i, e in enumerate(ex) for j in range(k)]
  return report, samples
