"""Shuffled, repeated, process-sharded prompt batches over a grain pipeline.

The order is defined on the global stream, independent of the process count:

  valid examples (N) ─► shuffle (a fresh permutation per epoch, from seed)
      ─► repeat (num_epochs, or forever) ─► global batches of G = prompts_per_step
      ─► process p of P takes rows [p*G/P, (p+1)*G/P) of every global batch

so the batches of processes 0..P-1 at step t, concatenated in process order,
are exactly the single-process batch at step t (what
``jax.make_array_from_process_local_data`` assembles), and shards are
disjoint within every global batch. A global batch may straddle an epoch
boundary (repeat, then batch); with ``num_epochs`` set, the final incomplete
global batch is dropped so that every process yields the same number of
batches.

Iterator state is grain's own ``{"next_index": t}`` (the number of global
batches consumed, the same on every process) plus fields that identify the
stream; restoring checks them, so a state cannot silently resume a different
dataset, seed or batch size. A state saved with one process count resumes
under another.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import grain

from jaxent.data._source import OVERLONG_MODES, DataStats, PromptSet, load_prompts


@dataclasses.dataclass(frozen=True)
class PromptBatch:
  """One process's share of one step's prompts (plain Python lists).

  Attributes:
    prompt_ids: ``B`` token-id lists, each of length ``<= max_prompt_len``.
    answers: ``B`` gold answers.
    prompts: ``B`` prompt texts as in the dataset (before any template).
    indices: ``B`` dataset row indices (``Example.index``).
    step: the global step this batch belongs to (0-based).
  """
  prompt_ids: list[list[int]]
  answers: list[str]
  prompts: list[str]
  indices: list[int]
  step: int

  def __len__(self) -> int:
    return len(self.indices)


@dataclasses.dataclass(frozen=True)
class PromptDataConfig:
  """How to build the prompt stream (validated on construction).

  Attributes:
    path: a JSONL (or Parquet, with pyarrow) file, or a tuple of them.
    prompts_per_step: prompts per global step (all processes together).
    prompt_key, answer_key: the field names.
    max_prompt_len: the longest prompt kept, in tokens.
    overlong: ``"skip"`` or ``"truncate_left"`` (see ``load_prompts``).
    chat_template: apply the tokenizer's chat template.
    system_prompt: an optional system turn (with ``chat_template``).
    seed: the shuffle seed (epoch ``e`` uses permutation ``seed + e``).
    shuffle: shuffle each epoch (else the file order, repeated).
    num_epochs: passes over the data; None repeats forever.
  """
  path: str | tuple[str, ...]
  prompts_per_step: int
  prompt_key: str = "prompt"
  answer_key: str = "answer"
  max_prompt_len: int = 1024
  overlong: str = "skip"
  chat_template: bool = False
  system_prompt: str | None = None
  seed: int = 0
  shuffle: bool = True
  num_epochs: int | None = None

  def __post_init__(self):
    def _int(name, lo):
      v = getattr(self, name)
      if not isinstance(v, int) or isinstance(v, bool) or v < lo:
        raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
    _int("prompts_per_step", 1)
    _int("max_prompt_len", 1)
    _int("seed", 0)
    if self.seed >= 2**32:
      raise ValueError(f"seed must be < 2**32, got {self.seed!r}")
    if self.num_epochs is not None:
      _int("num_epochs", 1)
    if self.overlong not in OVERLONG_MODES:
      raise ValueError(f"overlong must be one of {OVERLONG_MODES}, got {self.overlong!r}")
    if not self.path:
      raise ValueError("path must name at least one file")
    if self.system_prompt is not None and not self.chat_template:
      raise ValueError("system_prompt needs chat_template=True")


class PromptIterator:
  """Batches of prompts for one process, with checkpointable state.

  Args:
    prompt_set: the valid examples (``load_prompts``).
    prompts_per_step: global batch size ``G``; this process yields
      ``G // process_count`` prompts a step.
    seed: shuffle seed, ``0 <= seed < 2**32``.
    process_index, process_count: ``jax.process_index()`` and
      ``jax.process_count()`` (passed in, so tests can simulate processes).
    shuffle: reshuffle every epoch; else the dataset order, repeated.
    num_epochs: passes over the data; None repeats forever.

  Raises:
    ValueError: ``G`` not divisible by ``process_count``, a bad index, or a
      bad seed/epoch count.
  """

  def __init__(self, prompt_set: PromptSet, *, prompts_per_step: int, seed: int = 0,
               process_index: int = 0, process_count: int = 1,
               shuffle: bool = True, num_epochs: int | None = None):
    if not isinstance(prompts_per_step, int) or prompts_per_step < 1:
      raise ValueError(f"prompts_per_step must be an int >= 1, got {prompts_per_step!r}")
    if not isinstance(process_count, int) or process_count < 1:
      raise ValueError(f"process_count must be an int >= 1, got {process_count!r}")
    if not isinstance(process_index, int) or not 0 <= process_index < process_count:
      raise ValueError(
          f"process_index must be in [0, {process_count}), got {process_index!r}")
    if prompts_per_step % process_count:
      raise ValueError(
          f"prompts_per_step={prompts_per_step} must be divisible by "
          f"process_count={process_count}")
    if not isinstance(seed, int) or not 0 <= seed < 2**32:
      raise ValueError(f"seed must be an int in [0, 2**32), got {seed!r}")
    if num_epochs is not None and (not isinstance(num_epochs, int) or num_epochs < 1):
      raise ValueError(f"num_epochs must be None or an int >= 1, got {num_epochs!r}")
    self.prompt_set = prompt_set
    self.prompts_per_step = prompts_per_step
    self.per_process = prompts_per_step // process_count
    self.seed = seed
    self.process_index = process_index
    self.process_count = process_count
    self.shuffle = shuffle
    self.num_epochs = num_epochs

    ds = grain.MapDataset.source(prompt_set.examples)
    if shuffle:
      # grain's shuffle permutes each epoch of the repeated stream with seed
      # (seed + epoch): a different, reproducible order every epoch.
      ds = ds.shuffle(seed=seed)
    ds = ds.repeat(num_epochs)
    if num_epochs is not None:
      ds = ds[: (len(ds) // prompts_per_step) * prompts_per_step]
    ds = ds.batch(self.per_process, drop_remainder=True, batch_fn=list)
    ds = ds[process_index::process_count]
    self.num_steps = None if num_epochs is None else len(ds)
    # No reader threads: the examples are in memory, tokenized already.
    self._iter = ds.to_iter_dataset(
        grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)).__iter__()
    self._step = 0

  @property
  def stats(self) -> DataStats:
    """Counts of rows read and skipped (the same on every process)."""
    return self.prompt_set.stats

  @property
  def steps_per_epoch(self) -> float:
    """Global steps per pass over the valid examples."""
    return len(self.prompt_set) / self.prompts_per_step

  @property
  def step(self) -> int:
    """Global batches consumed so far."""
    return self._step

  def __iter__(self) -> PromptIterator:
    return self

  def __next__(self) -> PromptBatch:
    examples = next(self._iter)
    batch = PromptBatch(
        prompt_ids=[e.prompt_ids.tolist() for e in examples],
        answers=[e.answer for e in examples],
        prompts=[e.prompt for e in examples],
        indices=[e.index for e in examples],
        step=self._step)
    self._step += 1
    return batch

  def _identity(self) -> dict[str, Any]:
    return {
        "fingerprint": self.prompt_set.fingerprint,
        "num_examples": len(self.prompt_set),
        "prompts_per_step": self.prompts_per_step,
        "seed": self.seed,
        "shuffle": self.shuffle,
        "num_epochs": self.num_epochs,
    }

  def get_state(self) -> dict[str, Any]:
    """A small JSON-serialisable dict from which ``set_state`` resumes."""
    grain_state = self._iter.get_state()
    return {"version": 1, "step": self._step, "grain": dict(grain_state),
            **self._identity()}

  def set_state(self, state: dict[str, Any]) -> None:
    """Resumes from ``get_state()`` output: the next batches are the same.

    The state may come from a run with another process count (the step is
    global). Raises ValueError if it belongs to a different dataset
    (fingerprint), batch size, seed or epoch setting.
    """
    if not isinstance(state, dict) or state.get("version") != 1:
      raise ValueError(f"not a PromptIterator state: {state!r:.200}")
    mine = self._identity()
    diff = [k for k in mine if state.get(k) != mine[k]]
    if diff:
      raise ValueError(
          "data iterator state does not match this dataset/config: "
          + ", ".join(f"{k}: saved {state.get(k)!r}, now {mine[k]!r}" for k in diff))
    self._iter.set_state(state["grain"])
    self._step = int(state["step"])


def make_prompt_iterator(config: PromptDataConfig, tokenizer, *, process_index: int = 0,
                         process_count: int = 1) -> PromptIterator:
  """Loads ``config.path`` with ``tokenizer`` and returns this process's iterator.

  Raises:
    DataError: missing/unreadable file, or no valid row.
  """
  prompt_set = load_prompts(
      config.path, tokenizer, prompt_key=config.prompt_key, answer_key=config.answer_key,
      max_prompt_len=config.max_prompt_len, overlong=config.overlong,
      chat_template=config.chat_template, system_prompt=config.system_prompt)
  return PromptIterator(
      prompt_set, prompts_per_step=config.prompts_per_step, seed=config.seed,
      process_index=process_index, process_count=process_count,
      shuffle=config.shuffle, num_epochs=config.num_epochs)
