"""Evaluation of a policy on local benchmarks, with the paper's decoding presets.

For a benchmark of ``N`` prompts with ``k`` samples each and rewards
``r_ij`` (``i`` the prompt, ``j`` the sample)::

  mean@k = (1 / N k) sum_ij r_ij
  pass@k = (1 / N) sum_i [1 - C(n - c_i, k) / C(n, k)]   (Chen et al. 2021; here n = k)

with ``c_i`` the number of samples of prompt ``i`` whose reward is >= 0.5.
With ``temperature = 0`` one greedy sample is taken (``k = 1``), and then
mean@1 is the accuracy.

Presets (``PRESETS``) hold the paper's evaluation (Cui et al. 2025; see
``../shared/REFERENCE.md``): AIME24, AIME25 and AMC at temperature 0.6 with
the mean of 32 samples, MATH-500 greedy; responses up to 8192 tokens and
prompts up to 2048 (the paper's maximum response and prompt lengths); top-p 1
(no truncation: the paper states none for evaluation). A benchmark is
recognised by an explicit name or by its file name (``aime24.jsonl``,
``AIME_2025.jsonl``, ``math-500.jsonl``, ``amc23.jsonl``); explicit settings
override a preset's, and every report records the settings actually used.

This module also loads a trained run directory for evaluation and export, and
places a model on a device mesh for evaluation (``eval_mesh``,
``load_model_or_run(..., mesh=)``).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import time
from typing import Any, Mapping, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding, SingleDeviceSharding

from jaxent import config as config_lib
from jaxent import data as data_lib
from jaxent import models, rewards, sampler, sharding
from jaxent.config import Config, ConfigError
from jaxent.sharding import AXES
from jaxent.train._build import SetupError, load_policy, model_config

# Rows per sampler call and row shard (data x fsdp) when no batch size is given.
DEFAULT_ROWS_PER_SHARD = 64

# ------------------------------------------------------------------ settings

# The settings that say how to decode; a benchmark without a preset that is
# named explicitly needs at least one of them (otherwise the name is a typo).
DECODING_FIELDS = ("k", "temperature", "top_p", "top_k", "max_new_tokens")


def _is_int(x) -> bool:
  return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _keys(x, name: str) -> tuple[str, ...]:
  keys = (x,) if isinstance(x, str) else tuple(x)
  if not keys or not all(isinstance(s, str) and s for s in keys):
    raise ValueError(f"{name} must be a non-empty list of field names, got {x!r}")
  return keys


@dataclasses.dataclass(frozen=True)
class EvalSettings:
  """How one benchmark is decoded, graded and read. Validated on construction.

  The defaults are the settings of a benchmark without a preset (one greedy
  sample, the ``prompt``/``answer`` fields, the math grader).
  """
  k: int = 1                         # samples per prompt: mean@k and pass@k (greedy: 1)
  temperature: float = 0.0           # T; 0 is greedy
  top_p: float = 1.0                 # nucleus mass; 1 disables
  top_k: int = 0                     # 0 disables
  max_new_tokens: int = 1024         # R, the response budget in tokens
  max_prompt_len: int = 2048         # longer prompts are skipped and counted
  reward: str = "math"               # a jaxent.rewards name
  prompt_keys: tuple[str, ...] = ("prompt",)  # prompt field aliases, the first present wins
  answer_keys: tuple[str, ...] = ("answer",)  # gold answer field aliases
  chat_template: bool = False        # wrap the prompt in the tokenizer's chat template

  def __post_init__(self):
    object.__setattr__(self, "prompt_keys", _keys(self.prompt_keys, "prompt_keys"))
    object.__setattr__(self, "answer_keys", _keys(self.answer_keys, "answer_keys"))
    if not _is_int(self.k) or self.k < 1:
      raise ValueError(f"k (samples per prompt) must be an int >= 1, got {self.k!r}")
    t = self.temperature
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
      raise ValueError(f"temperature must be a finite number >= 0 (0: greedy), got {t!r}")
    if t == 0 and self.k != 1:
      raise ValueError(f"k={self.k} with temperature 0: greedy decoding gives one sample per "
                       f"prompt (k=1); use a temperature > 0 for mean@k")
    p = self.top_p
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1:
      raise ValueError(f"top_p must be in (0, 1] (1 disables), got {p!r}")
    if not _is_int(self.top_k) or self.top_k < 0:
      raise ValueError(f"top_k must be an int >= 0 (0 disables), got {self.top_k!r}")
    for name in ("max_new_tokens", "max_prompt_len"):
      v = getattr(self, name)
      if not _is_int(v) or v < 1:
        raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    if not isinstance(self.chat_template, bool):
      raise ValueError(f"chat_template must be a bool, got {self.chat_template!r}")
    rewards.reward_spec(self.reward)  # ValueError listing the registered names


@dataclasses.dataclass(frozen=True)
class EvalPreset:
  """A benchmark's evaluation as the paper ran it.

  Attributes:
    name: the canonical name (``aime24``, ``aime25``, ``amc``, ``math500``).
    settings: decoding, grading and the accepted field names.
    pattern: a regex over a normalised name (lowercase letters and digits
      only): an explicit name must match it whole, a file name from one of
      its words on (``test_AIME_2024.jsonl`` -> ``aime2024``).
    description: what the preset is, for ``--list-presets``.
  """
  name: str
  settings: EvalSettings
  pattern: str
  description: str

  def matches(self, normalised: str, *, whole: bool) -> bool:
    rx = f"(?:{self.pattern})" + ("" if whole else r"(?!\d)")
    return bool((re.fullmatch if whole else re.match)(rx, normalised))


# Field names of the common public copies: MATH-500 (HuggingFaceH4) has
# problem/solution/answer; AIME 2024 copies problem/answer or
# Problem/Solution/Answer; AIME 2025 and AMC23 copies question/answer or
# problem/answer. A MATH-style ``solution`` holds the worked solution ending
# in \boxed{...}, which the math grader reads as the gold answer.
_PROMPT_KEYS = ("problem", "question", "prompt", "Problem", "Question")
_ANSWER_KEYS = ("answer", "Answer")

# The paper: temperature 0.6 and mean@32 for AIME/AMC, greedy elsewhere;
# max response 8192 and max prompt 2048 tokens; no top-p truncation.
_SAMPLED = EvalSettings(k=32, temperature=0.6, top_p=1.0, max_new_tokens=8192,
                        max_prompt_len=2048, reward="math", prompt_keys=_PROMPT_KEYS,
                        answer_keys=_ANSWER_KEYS)
_GREEDY = dataclasses.replace(_SAMPLED, k=1, temperature=0.0)

PRESETS: dict[str, EvalPreset] = {p.name: p for p in (
    EvalPreset("aime24", _SAMPLED, r"aime(?:20)?24",
               "AIME 2024 (30 problems): T=0.6, mean@32"),
    EvalPreset("aime25", _SAMPLED, r"aime(?:20)?25",
               "AIME 2025 (30 problems): T=0.6, mean@32"),
    EvalPreset("amc", _SAMPLED, r"amc(?:20)?23|amc",
               "AMC 2023 (40 problems): T=0.6, mean@32"),
    EvalPreset("math500", dataclasses.replace(_GREEDY, answer_keys=_ANSWER_KEYS + ("solution",)),
               r"math500", "MATH-500: greedy (k=1)"),
)}


def _normalise(text: str) -> str:
  return re.sub(r"[^a-z0-9]", "", text.lower())


def preset_for_name(name: str) -> EvalPreset | None:
  """The preset a benchmark name denotes (``AIME-2024``, ``aime24``, ``MATH_500``), or None."""
  n = _normalise(name)
  return next((p for p in PRESETS.values() if p.matches(n, whole=True)), None)


def preset_for_file(path: str) -> EvalPreset | None:
  """The preset a file name denotes, or None.

  The file's stem is split into words (runs of letters and digits); from
  each word on, the joined rest is tried against each preset's pattern, so
  ``aime24.jsonl``, ``AIME_2025.jsonl``, ``math-500.jsonl``,
  ``test_math500.jsonl`` and ``amc23.jsonl`` are recognised, ``heldout.jsonl``
  or ``amc12.jsonl`` are not.
  """
  stem = os.path.basename(os.fspath(path)).split(".")[0]
  words = re.findall(r"[a-z0-9]+", stem.lower())
  for i in range(len(words)):
    rest = "".join(words[i:])
    for p in PRESETS.values():
      if p.matches(rest, whole=False):
        return p
  return None


@dataclasses.dataclass(frozen=True)
class Benchmark:
  """One benchmark to evaluate, its settings resolved.

  Attributes:
    name: the report's label: the preset's name, else the name given, else
      the file name.
    path: the JSONL (or Parquet) file.
    settings: the settings used (preset, then overrides).
    preset: the preset applied, or None.
    overrides: the settings given explicitly (they beat the preset's).
    notes: what the resolution decided that a user should know (printed).
  """
  name: str
  path: str
  settings: EvalSettings
  preset: str | None
  overrides: tuple[str, ...] = ()
  notes: tuple[str, ...] = ()


def split_spec(spec: str) -> tuple[str | None, str]:
  """``NAME=PATH`` -> (NAME, PATH); a bare ``PATH`` -> (None, PATH)."""
  name, sep, path = spec.partition("=")
  if not sep or os.path.exists(spec) or os.sep in name or not name or not path:
    return None, spec
  return name, path


def resolve_benchmark(spec: str, overrides: Mapping[str, Any] | None = None, *,
                      presets: bool = True) -> Benchmark:
  """Settings for ``spec`` (``NAME=PATH`` or ``PATH``): preset, then ``overrides``.

  Args:
    spec: ``NAME=PATH`` names the benchmark (a preset name or alias, or any
      label when ``overrides`` say how to decode); a bare ``PATH`` is
      recognised by its file name, or evaluated with ``overrides`` over the
      ``EvalSettings`` defaults.
    overrides: ``EvalSettings`` fields given explicitly (``prompt_key`` /
      ``answer_key`` set a single field name). None values are ignored.
    presets: False ignores the preset table.

  Raises:
    ValueError: an unknown explicit name with no decoding override, an
      unknown override, or invalid settings (the message names them).
  """
  name, path = split_spec(spec)
  given = {k: v for k, v in (overrides or {}).items() if v is not None}
  given_names = tuple(sorted(given))
  fields = {f.name for f in dataclasses.fields(EvalSettings)}
  for key in ("prompt_key", "answer_key"):
    if key in given:
      given[key + "s"] = (given.pop(key),)
  unknown = sorted(set(given) - fields)
  if unknown:
    raise ValueError(f"unknown evaluation setting(s) {unknown}; known: {sorted(fields)}")
  notes = []
  preset = None
  if presets:
    preset = preset_for_name(name) if name is not None else preset_for_file(path)
  if preset is None:
    base = EvalSettings()
    label = name if name is not None else os.path.basename(path)
    if presets and name is not None and not set(given) & set(DECODING_FIELDS):
      raise ValueError(
          f"unknown benchmark {name!r} (for {path}): the presets are {', '.join(PRESETS)}; "
          f"to evaluate it with explicit settings give at least one of "
          f"{', '.join('--' + f.replace('_', '-') for f in DECODING_FIELDS)}")
    if presets:
      notes.append(f"{label}: no preset matches the file name; using the explicit settings over "
                   f"the defaults")
  else:
    base = preset.settings
    label = preset.name
  values = {f: getattr(base, f) for f in fields}
  values.update(given)
  k = values["k"]
  if values["temperature"] == 0 and _is_int(k) and k > 1:
    notes.append(f"{label}: k={k} dropped: temperature 0 is greedy, one sample per prompt (k=1)")
    values["k"] = 1
  settings = EvalSettings(**values)
  return Benchmark(name=label, path=path, settings=settings,
                   preset=None if preset is None else preset.name,
                   overrides=given_names, notes=tuple(notes))


def resolve_fields(path: str, prompt_keys: Sequence[str],
                   answer_keys: Sequence[str]) -> tuple[str, str]:
  """The (prompt, answer) field names of a benchmark file, from its first JSON object row.

  Each is the first of its aliases present in that row. Rows that are not
  JSON objects are passed over here (the loader counts them as skipped);
  later rows lacking the chosen fields are skipped and counted too.

  Raises:
    data.DataError: the file is missing or unreadable, or the first object
      row has none of the aliases (naming the file, the row and its keys).
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise data_lib.DataError(f"benchmark file not found: {path!r}"
                             if not os.path.exists(path) else
                             f"benchmark path is not a file: {path!r}")
  if not path.endswith((".jsonl", ".parquet")):
    raise data_lib.DataError(f"unsupported benchmark file {path!r}: expected .jsonl or .parquet")
  first = None
  if path.endswith(".parquet"):
    try:
      import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
      names = pq.read_schema(path).names
    except (ImportError, OSError, ValueError) as e:
      raise data_lib.DataError(f"cannot read benchmark file {path!r}: {e}") from e
    first = ("row 0", {n: None for n in names})
  else:
    try:
      with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
          try:
            row = json.loads(raw.decode("utf-8")) if raw.strip() else None
          except (UnicodeDecodeError, ValueError, RecursionError):
            continue
          if isinstance(row, dict):
            first = (f"line {n}", row)
            break
    except OSError as e:
      raise data_lib.DataError(f"cannot read benchmark file {path!r}: {e.strerror or e}") from e
  if first is None:  # no usable row: the loader reports the counts
    return prompt_keys[0], answer_keys[0]
  where, row = first
  chosen = []
  for what, aliases in (("prompt", prompt_keys), ("answer", answer_keys)):
    key = next((a for a in aliases if a in row), None)
    if key is None:
      flag = f"--{what}-key"
      raise data_lib.DataError(
          f"{path} {where}: no {what} field: expected one of {list(aliases)}, the row has keys "
          f"{sorted(row)} (name the field with {flag})")
    chosen.append(key)
  return chosen[0], chosen[1]


# ---------------------------------------------------------------- evaluation

def pass_at_k(correct: np.ndarray, k: int) -> float:
  """Unbiased pass@k (Chen et al., 2021) from ``correct`` [prompts, n] with n >= k."""
  correct = np.asarray(correct, bool)
  n = correct.shape[1]
  if not 1 <= k <= n:
    raise ValueError(f"k={k} must be in [1, {n}] (samples per prompt)")
  c = correct.sum(axis=1)
  # 1 - C(n-c, k) / C(n, k), computed as a product for stability
  out = np.ones(len(c))
  for i, ci in enumerate(c):
    if n - ci < k:
      continue
    out[i] = 1.0 - np.prod(1.0 - k / np.arange(n - ci + 1, n + 1))
  return float(out.mean())


def _samples_per_call(k: int, rows: int) -> int:
  """The largest divisor of ``k`` that is <= ``rows``.

  When one prompt's ``k`` samples exceed the row budget they are drawn in
  ``k / d`` equal calls of ``d`` samples: equal calls share one compiled
  program (``num_samples`` is static in the sampler).
  """
  return max(d for d in range(1, min(k, rows) + 1) if k % d == 0)


def _eos_ids(tok, cfg) -> list[int] | None:
  """The tokenizer's EOS and the model config's EOS ids (Qwen2.5 instruct lists two)."""
  ids = [getattr(tok, "eos_token_id", None)]
  cfg_eos = getattr(cfg, "eos_token_id", None)
  ids += list(cfg_eos) if isinstance(cfg_eos, (tuple, list)) else [cfg_eos]
  ids = sorted({int(i) for i in ids if _is_int(i) and 0 <= i < cfg.vocab_size})
  return ids or None


def evaluate_benchmark(model, tok, benchmark: Benchmark | str, *, batch_size: int | None = None,
                       seed: int = 0, timeout_s: float = 5.0, skip_special_tokens: bool = True,
                       return_samples: bool = False, presets: bool = True, mesh: Mesh | None = None,
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
  mesh = _params_mesh(model.params) if mesh is None else mesh
  if mesh is not None and mesh.size == 1:
    mesh = None
  shape = {a: 1 for a in AXES} if mesh is None else {a: int(mesh.shape.get(a, 1)) for a in AXES}
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
  per_call = _samples_per_call(k, batch_size)
  prompts_per_call = min(n, max(1, batch_size // per_call))
  # One prompt bucket and one batch bucket for the whole benchmark: every
  # call has the same shapes (the sampler pads prompts and prompt count).
  p_bucket = sampler.Sampler(model.config).prompt_bucket(max(len(e.prompt_ids) for e in ex))
  eos = _eos_ids(tok, model.config)
  key = jax.random.PRNGKey(seed)

  rew = np.zeros((n, k), np.float32)
  lengths = np.zeros((n, k), np.int32)
  finished = np.zeros((n, k), bool)
  texts_all: list[list[str | None]] = [[None] * k for _ in range(n)]
  fails = timeouts = 0

  def launch(i: int, rep: int):
    chunk = [e.prompt_ids.tolist() for e in ex[i:i + prompts_per_call]]
    return sampler.generate(
        model, chunk, max_new_tokens=r_len, temperature=s.temperature, top_p=s.top_p,
        top_k=s.top_k, eos_id=eos, num_samples=per_call,
        key=jax.random.fold_in(jax.random.fold_in(key, i), rep),
        prompt_buckets=(p_bucket,), batch_buckets=(prompts_per_call,), mesh=mesh)

  def grade(i: int, rep: int, toks, mask):
    nonlocal fails, timeouts
    b = toks.shape[0] // per_call
    texts = [tok.decode([int(t) for t in row[m > 0]], skip_special_tokens=skip_special_tokens)
             for row, m in zip(toks, mask)]
    gold = [e.answer for e in ex[i:i + b] for _ in range(per_call)]
    res = rewards.grade_batch(s.reward, texts, gold, timeout_s=timeout_s)
    cols = slice(rep * per_call, (rep + 1) * per_call)
    rew[i:i + b, cols] = res.rewards.reshape(b, per_call)
    ln = mask.sum(axis=1)
    lengths[i:i + b, cols] = ln.reshape(b, per_call)
    last = toks[np.arange(len(toks)), np.maximum(ln - 1, 0)]
    done = (ln > 0) & np.isin(last, eos if eos else [-1])
    finished[i:i + b, cols] = done.reshape(b, per_call)
    for j, text in enumerate(texts):
      texts_all[i + j // per_call][rep * per_call + j % per_call] = text
    fails += res.failures
    timeouts += res.timeouts

  # The host grades call c while the device generates call c + 1; only one
  # call's KV cache is alive at a time (call c is fetched before c + 1 starts).
  # With several processes the responses are gathered to every host (a
  # collective: every process fetches every call) and process 0 grades.
  pending = None
  for i in range(0, n, prompts_per_call):
    for rep in range(k // per_call):
      out = launch(i, rep)
      if pending is not None and is_main:
        grade(*pending)
      pending = (i, rep, sharding.host_array(out.tokens), sharding.host_array(out.mask))  # host sync
  if not is_main:
    return None
  grade(*pending)

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
      f"mean@{k}": float(rew.mean()), f"pass@{k}": pass_at_k(rew >= 0.5, k),
      "mean_response_len": float(lengths.mean()),
      "truncated_frac": float((~finished).mean()),
      "reward_failures": int(fails), "reward_timeouts": int(timeouts),
      "skipped_rows": ps.stats.rows - ps.stats.valid, "skipped": kinds,
      "time_s": round(time.perf_counter() - t0, 3),
  }
  if not return_samples:
    return report
  samples = [{"benchmark": bench.name, "index": e.index, "sample": j, "prompt": e.prompt,
              "answer": e.answer, "response": texts_all[i][j], "reward": float(rew[i, j]),
              "length": int(lengths[i, j]), "finished": bool(finished[i, j])}
             for i, e in enumerate(ex) for j in range(k)]
  return report, samples


def format_table(reports: Sequence[Mapping[str, Any]]) -> str:
  """The reports as an aligned text table (mean@k and pass@k in percent)."""
  head = ["benchmark", "preset", "prompts", "k", "T", "top_p", "max_new", "mean@k", "pass@k",
          "skipped", "grader_fail"]
  rows = [head]
  for r in reports:
    k = r["k"]
    rows.append([str(r["benchmark"]), str(r["preset"] or "-"), str(r["prompts"]), str(k),
                 f"{r['temperature']:g}", f"{r['top_p']:g}", str(r["max_new_tokens"]),
                 f"{100 * r[f'mean@{k}']:.1f}", f"{100 * r[f'pass@{k}']:.1f}",
                 str(r["skipped_rows"]), str(r["reward_failures"] + r["reward_timeouts"])])
  widths = [max(len(row[c]) for row in rows) for c in range(len(head))]
  lines = ["  ".join(cell.ljust(w) if c < 2 else cell.rjust(w)
                     for c, (cell, w) in enumerate(zip(row, widths))) for row in rows]
  return "\n".join(lines)


def format_presets() -> str:
  """The preset table, one line per preset."""
  out = []
  for p in PRESETS.values():
    s = p.settings
    out.append(f"{p.name:8s} k={s.k:<3d} T={s.temperature:<4g} top_p={s.top_p:g} "
               f"max_new_tokens={s.max_new_tokens} fields={'/'.join(s.prompt_keys)} -> "
               f"{'/'.join(s.answer_keys)}  {p.description}")
  return "\n".join(out)


# ------------------------------------------------------------------- loading

def _read_run_config(run_dir: str) -> Config:
  cfg_path = os.path.join(run_dir, "config.yaml")
  if not os.path.isfile(cfg_path):
    raise SetupError(f"{run_dir} is not a run directory: {cfg_path} is missing")
  return config_lib.load(cfg_path)


def model_config_of(path: str, dtype: str = "float32"):
  """(model config, run config or None) of a HF or run directory; reads no weights."""
  if os.path.isfile(os.path.join(path, "config.yaml")):
    cfg = _read_run_config(path)
    return model_config(cfg), cfg
  if os.path.isfile(os.path.join(path, "config.json")):
    try:
      return models.load_config(path, dtype=dtype), None
    except (FileNotFoundError, ValueError, OSError) as e:
      raise SetupError(f"cannot load {path}: {e}") from e
  raise SetupError(f"{path} is neither a Hugging Face directory (config.json) nor a jaxent run "
                   f"directory (config.yaml)")


def eval_mesh(path: str, shape: Sequence[int] | None = None, *, dtype: str = "float32",
              what: str = "--mesh") -> tuple[Mesh | None, str | None]:
  """The mesh to evaluate ``path`` on, and a note for the user (or None).

  ``shape`` (``parse_mesh``) is checked against this job's devices and the
  model's heads (``sharding.plan_shape``: the product must equal the devices,
  or with one process divide them; ``tensor`` must divide the attention and
  KV heads). Without it, a run directory uses its own ``mesh:`` section, as
  ``jaxent train`` planned it (``sharding.plan_mesh``: the mesh it trained on)
  when that fits the devices here, else one device (with a note); a HF
  directory uses one device. With several processes a mesh over every
  device is required. Returns ``(None, note)`` for one device.

  Raises:
    ConfigError: ``shape`` does not fit (the message starts with ``what``);
      SetupError: an unreadable model directory.
  """
  mcfg, run_cfg = model_config_of(path, dtype)
  n, procs = jax.device_count(), jax.process_count()
  if shape is not None:
    plan = sharding.plan_shape(shape, n, process_count=procs, model_config=mcfg, what=what)
  elif run_cfg is not None:
    try:
      plan = sharding.plan_mesh(run_cfg, n, process_count=procs, model_config=mcfg)
    except ConfigError as e:
      if procs > 1:
        raise ConfigError(f"the run's mesh does not fit this job ({e}); give {what} over all "
                          f"{n} devices, e.g. {what} fsdp={n}") from e
      return None, (f"the run's mesh does not fit the {n} devices here ({e}); evaluating on one "
                    f"device (give {what} to choose a mesh)")
  else:
    if procs > 1:
      raise ConfigError(f"{procs} processes evaluate on one mesh: give {what} over all {n} "
                        f"devices, e.g. {what} fsdp={n}")
    return None, None
  if plan.size == 1:
    return None, plan.note
  return plan.make_mesh(), plan.note


def _params_mesh(params) -> Mesh | None:
  """The one mesh every parameter is laid out on (``NamedSharding``), else None."""
  meshes = set()
  for x in jax.tree.leaves(params):
    sh = getattr(x, "sharding", None)
    if not isinstance(sh, NamedSharding) or not isinstance(sh.mesh, Mesh):
      return None
    meshes.add(sh.mesh)
  return meshes.pop() if len(meshes) == 1 else None


def _restore_params(ck_dir: str, step: int | None, abstract_params):
  """(params, step): only the params of checkpoint ``step`` (default: the latest), as laid out
  by ``abstract_params`` (``ShapeDtypeStruct``s with shardings).

  A partial restore: orbax reads each parameter's shards straight onto the
  devices that hold them (every process its own), and the optimizer state
  (twice the parameters again with Adam) is never read.
  """
  mgr = ocp.CheckpointManager(ck_dir, options=ocp.CheckpointManagerOptions(create=False))
  try:
    step = mgr.latest_step() if step is None else step
    if step is None:
      raise SetupError(f"no complete checkpoint under {ck_dir}")
    target = {"params": abstract_params}
    try:
      out = mgr.restore(step, args=ocp.args.Composite(
          state=ocp.args.PyTreeRestore(
              item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
              partial_restore=True),
          host=ocp.args.JsonRestore()))
    except Exception as e:  # noqa: BLE001 - orbax raises many kinds for a damaged checkpoint
      raise SetupError(f"cannot restore checkpoint {step} in {ck_dir}: {e}") from e
  finally:
    mgr.close()
  return out["state"]["params"], step


def load_run(run_dir: str, step: int | None = None, *, mesh: Mesh | None = None):
  """(config, model with the checkpoint's params, tokenizer, step) of a run directory.

  With ``mesh``, every parameter is restored straight into its layout on
  ``mesh`` (``models.param_shardings``: the trainer's and sampler's), each
  process reading only its devices' shards; without it, onto this process's
  first device. Only the params are read (not the optimizer state), and
  ``model.path`` is not read at all: the checkpoint holds the weights.
  """
  cfg = _read_run_config(run_dir)
  # Shapes only: the checkpoint supplies the weights (reading model.path too
  # would put a whole second copy of the model on the devices).
  model, tok = load_policy(cfg, weights=False)
  ck_dir = os.path.join(run_dir, "checkpoints")
  if not os.path.isdir(ck_dir):
    raise SetupError(f"{run_dir} has no checkpoints/ directory")
  if mesh is not None:
    shardings = models.param_shardings(model.config, mesh)
  else:
    one = SingleDeviceSharding(jax.local_devices()[0])
    shardings = jax.tree.map(lambda _: one, model.params)
  abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          model.params, shardings)
  params, step = _restore_params(ck_dir, step, abstract)
  return cfg, model.replace(params=params), tok, step


def load_model_or_run(path: str, dtype: str = "float32", *, mesh: Mesh | None = None):
  """A HF directory (config.json) or a jaxent run directory (config.yaml + checkpoints).

  With ``mesh`` the params are loaded straight into their layout on it (a HF
  directory through ``models.from_pretrained(path, mesh=)``, a run through
  ``load_run(path, mesh=)``); ``evaluate_benchmark`` then generates on that
  mesh. ``eval_mesh`` chooses one as ``jaxent eval`` does.
  """
  if os.path.isfile(os.path.join(path, "config.yaml")):
    cfg, model, tok, _ = load_run(path, mesh=mesh)
    return model, tok, cfg
  if os.path.isfile(os.path.join(path, "config.json")):
    try:
      return (models.from_pretrained(path, dtype=dtype, mesh=mesh), models.load_tokenizer(path),
              None)
    except (FileNotFoundError, ValueError, OSError) as e:
      raise SetupError(f"cannot load {path}: {e}") from e
  raise SetupError(f"{path} is neither a Hugging Face directory (config.json) nor a jaxent run "
                   f"directory (config.yaml)")
