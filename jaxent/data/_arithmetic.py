"""A generated multi-step arithmetic task and its character tokenizer.

Prompt ``ab+cd+ef=`` (``num_operands`` operands of exactly ``num_digits``
digits, no leading zeros); answer ``S1;S2$``: the running partial sums
``S_j = x_1 + ... + x_{j+1}`` for ``j = 1 .. num_operands-1``, separated by
``;`` and terminated by ``$``, the end-of-sequence character. The final sum
is the verifiable answer (``jaxent.rewards`` grader ``"arithmetic_exact"``).

Splits are a property of the problem, not of the draw: a problem is held out
iff a fixed 64-bit hash of its operands falls under ``heldout_fraction``, so
train and held-out sets are disjoint for every seed and every size.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Sequence

import numpy as np

PAD = "_"
EOS = "$"
ALPHABET = PAD + "0123456789+=;" + EOS  # 15 symbols; id = position
SPLITS = ("train", "heldout")


def _splitmix64(x: np.ndarray) -> np.ndarray:
  """The splitmix64 finaliser on uint64 (wrapping arithmetic, vectorised)."""
  with np.errstate(over="ignore"):
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


@dataclasses.dataclass(frozen=True)
class ArithmeticTask:
  """Sums of ``num_operands`` numbers of ``num_digits`` digits each.

  Attributes:
    num_operands: operands per prompt, >= 2.
    num_digits: digits per operand, 1..6.
    heldout_fraction: the share of all problems reserved for held-out
      evaluation, in (0, 1).
  """
  num_operands: int = 3
  num_digits: int = 2
  heldout_fraction: float = 0.05

  def __post_init__(self):
    if not isinstance(self.num_operands, int) or self.num_operands < 2:
      raise ValueError(f"num_operands must be an int >= 2, got {self.num_operands!r}")
    if not isinstance(self.num_digits, int) or not 1 <= self.num_digits <= 6:
      raise ValueError(f"num_digits must be an int in [1, 6], got {self.num_digits!r}")
    if not 0.0 < self.heldout_fraction < 1.0:
      raise ValueError(f"heldout_fraction must be in (0, 1), got {self.heldout_fraction!r}")

  @property
  def num_problems(self) -> int:
    """Distinct problems in both splits together."""
    return (9 * 10 ** (self.num_digits - 1)) ** self.num_operands

  @property
  def prompt_len(self) -> int:
    """Characters (= tokens) in every prompt."""
    return self.num_operands * (self.num_digits + 1)

  @property
  def max_answer_len(self) -> int:
    """Characters (= tokens) in the longest answer, ``$`` included."""
    lens = [len(str((j + 1) * (10 ** self.num_digits - 1)))
            for j in range(1, self.num_operands)]
    return sum(lens) + len(lens)

  def prompt(self, operands: Sequence[int]) -> str:
    return "+".join(str(int(x)) for x in operands) + "="

  def answer(self, operands: Sequence[int]) -> str:
    sums = np.cumsum([int(x) for x in operands])[1:]
    return ";".join(str(int(s)) for s in sums) + EOS

  def is_heldout(self, operands: np.ndarray) -> np.ndarray:
    """bool ``[n]`` for int operands ``[n, num_operands]``: in the held-out split."""
    ops = np.asarray(operands, np.uint64).reshape(-1, self.num_operands)
    key = np.zeros(len(ops), np.uint64)
    with np.errstate(over="ignore"):
      for j in range(self.num_operands):  # a unique integer code of the tuple
        key = key * np.uint64(10 ** self.num_digits) + ops[:, j]
    u = (_splitmix64(key) >> np.uint64(11)).astype(np.float64) / 2.0**53
    return u < self.heldout_fraction

  def sample_operands(self, n: int, *, seed: int, split: str = "train",
                      unique: bool = True) -> np.ndarray:
    """int64 ``[n, num_operands]`` operands of the split, deterministic in seed.

    Args:
      n: how many problems.
      seed: the generator's seed.
      split: ``"train"`` or ``"heldout"``.
      unique: no problem twice (else drawn with replacement).

    Raises:
      ValueError: bad split, or more unique problems asked than the split has.
    """
    if split not in SPLITS:
      raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not isinstance(n, int) or n < 0:
      raise ValueError(f"n must be an int >= 0, got {n!r}")
    share = self.heldout_fraction if split == "heldout" else 1.0 - self.heldout_fraction
    if unique and n > 0.9 * share * self.num_problems:
      raise ValueError(
          f"n={n} unique {split} problems asked, but the split holds only about "
          f"{int(share * self.num_problems)}")
    rng = np.random.default_rng(seed)
    lo, hi = 10 ** (self.num_digits - 1), 10 ** self.num_digits
    if self.num_digits == 1:
      lo = 1
    kept = np.zeros((0, self.num_operands), np.int64)
    while len(kept) < n:
      draw = rng.integers(lo, hi, size=(max(2 * (n - len(kept)), 64), self.num_operands))
      draw = draw[self.is_heldout(draw) == (split == "heldout")]
      kept = np.concatenate([kept, draw])
      if unique:
        _, first = np.unique(kept, axis=0, return_index=True)
        kept = kept[np.sort(first)]  # keep the draw order, drop repeats
    return kept[:n]

  def examples(self, n: int, *, seed: int, split: str = "train",
               unique: bool = True) -> list[dict[str, str]]:
    """``n`` records ``{"prompt": "ab+cd+ef=", "answer": "S1;S2$"}``."""
    ops = self.sample_operands(n, seed=seed, split=split, unique=unique)
    return [{"prompt": self.prompt(o), "answer": self.answer(o)} for o in ops]

  def write_jsonl(self, path: str | os.PathLike, n: int, *, seed: int,
                  split: str = "train", unique: bool = True) -> str:
    """Writes ``examples(...)`` as JSONL (the format ``load_prompts`` reads).

    Atomically: the rows go to a temporary file beside ``path``, renamed over
    it when complete, so a reader (another process, a resumed run) never sees
    a half-written file and a failed write leaves the old file as it was.
    """
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
      with open(tmp, "w", encoding="utf-8") as f:
        for rec in self.examples(n, seed=seed, split=split, unique=unique):
          f.write(json.dumps(rec) + "\n")
      os.replace(tmp, path)
    except BaseException:
      if os.path.lexists(tmp):
        os.remove(tmp)
      raise
    return path


class CharTokenizer:
  """One token per character of ``_0123456789+=;$``.

  Ids: ``_`` (pad) 0, digits 1..10, ``+`` 11, ``=`` 12, ``;`` 13, ``$``
  (eos) 14. Offers the part of the Hugging Face tokenizer interface that
  jaxent uses (``encode``, ``decode``, ``batch_decode``, ``__call__``,
  ``pad_token_id``, ``eos_token_id``, ``vocab_size``), so the trainer can take
  either. There is no BOS token and no chat template.
  """

  pad_token = PAD
  eos_token = EOS
  bos_token = None
  bos_token_id = None
  chat_template = None

  def __init__(self):
    self._to_id = {c: i for i, c in enumerate(ALPHABET)}
    self.pad_id = self._to_id[PAD]
    self.eos_id = self._to_id[EOS]

  @property
  def vocab_size(self) -> int:
    return len(ALPHABET)

  @property
  def pad_token_id(self) -> int:
    return self.pad_id

  @property
  def eos_token_id(self) -> int:
    return self.eos_id

  def __len__(self) -> int:
    return len(ALPHABET)

  def get_vocab(self) -> dict[str, int]:
    return dict(self._to_id)

  def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
    """Token ids of ``text`` (``add_special_tokens`` is accepted and ignored:
    there is no BOS, and EOS is the ``$`` character).

    Raises:
      ValueError: a character outside the alphabet (named).
    """
    del add_special_tokens
    try:
      return [self._to_id[c] for c in text]
    except KeyError as e:
      raise ValueError(
          f"CharTokenizer cannot encode {e.args[0]!r}; alphabet is {ALPHABET!r}") from None

  def __call__(self, text: str | Sequence[str], add_special_tokens: bool = False):
    if isinstance(text, str):
      return {"input_ids": self.encode(text)}
    return {"input_ids": [self.encode(t) for t in text]}

  def decode(self, ids, skip_special_tokens: bool = False) -> str:
    """Text of ``ids`` (ints, or an int array). With ``skip_special_tokens``
    pad and eos are dropped.

    Raises:
      ValueError: an id outside ``[0, vocab_size)``.
    """
    ids = np.asarray(ids).reshape(-1).tolist()
    out = []
    for i in ids:
      if not 0 <= i < len(ALPHABET):
        raise ValueError(f"token id {i} is outside [0, {len(ALPHABET)})")
      if skip_special_tokens and i in (self.pad_id, self.eos_id):
        continue
      out.append(ALPHABET[i])
    return "".join(out)

  def batch_decode(self, sequences, skip_special_tokens: bool = False) -> list[str]:
    return [self.decode(s, skip_special_tokens=skip_special_tokens) for s in sequences]

  def apply_chat_template(self, *args, **kwargs):
    raise ValueError("CharTokenizer has no chat template")


@dataclasses.dataclass(frozen=True)
class DecoyLabels:
  """A difficulty knob for the supervised warm start: a learned wrong answer on a subset.

  On the problems whose last operand is ``last_operand`` (about a ninth of
  them with one-digit operands), the supervised answer's last partial sum is
  replaced by ``sum + offset`` with probability ``prob``. A policy trained on
  these labels has the decoy as its mode on that subset and samples the right
  chain rarely (about ``1 - prob`` of the time, less after the other digits'
  noise): RL finds the right answer there only by exploring. The subset is a
  property of the prompt, so a policy can learn to tell it apart.

  Attributes:
    last_operand: the last operand that marks a problem of the subset.
    prob: probability in [0, 1] that a supervised answer of the subset is the decoy.
    offset: added to the last partial sum in the decoy, != 0.
  """
  last_operand: int = 9
  prob: float = 0.9
  offset: int = -1

  def __post_init__(self):
    if not isinstance(self.last_operand, int) or self.last_operand < 0:
      raise ValueError(f"last_operand must be an int >= 0, got {self.last_operand!r}")
    if not 0.0 <= self.prob <= 1.0:
      raise ValueError(f"prob must be in [0, 1], got {self.prob!r}")
    if not isinstance(self.offset, int) or self.offset == 0:
      raise ValueError(f"offset must be a nonzero int, got {self.offset!r}")

  def applies(self, operands: np.ndarray) -> np.ndarray:
    """bool ``[n]`` for int operands ``[n, num_operands]``: the problem is in the subset."""
    ops = np.asarray(operands)
    if ops.ndim != 2:
      raise ValueError(f"operands must be [n, num_operands], got shape {ops.shape}")
    return ops[:, -1] == self.last_operand

  def decoy(self, task: ArithmeticTask, operands: Sequence[int]) -> str:
    """The answer of ``task`` with its last partial sum moved by ``offset``."""
    sums = [int(s) for s in np.cumsum([int(x) for x in operands])[1:]]
    sums[-1] = max(sums[-1] + self.offset, 0)
    return ";".join(str(s) for s in sums) + EOS

  def label(self, task: ArithmeticTask, operands: Sequence[int], rng: np.random.Generator) -> str:
    """The supervised answer: the decoy with probability ``prob`` on the subset, else the answer."""
    if int(operands[-1]) == self.last_operand and rng.random() < self.prob:
      return self.decoy(task, operands)
    return task.answer(operands)


@dataclasses.dataclass(frozen=True)
class CarryDecoy:
  """A difficulty knob for the supervised warm start: the last carry dropped.

  On the problems whose last addition carries out of the units digit
  (``(S_{n-1} mod 10) + (x_n mod 10) >= 10``: about half of them with five
  one-digit operands), the supervised answer's last partial sum is replaced
  by ``S_n - 10`` (the carry forgotten) with probability ``prob``. The
  decoy is what the right answer looks like on the other problems, whose
  last addition does not carry: the warm start learns one rule, "copy the
  tens digit of ``S_{n-1}``", that RL on those problems rewards and
  sharpens, while the subset's right answer needs the carry the rule
  leaves out. Whether a problem is in the subset is computed from the
  operands, not read off one token of the prompt.

  Attributes:
    prob: probability in [0, 1] that a supervised answer of the subset is the decoy.
  """
  prob: float = 1.0

  def __post_init__(self):
    if isinstance(self.prob, bool) or not isinstance(self.prob, (int, float)) \
        or not 0.0 <= self.prob <= 1.0:
      raise ValueError(f"prob must be in [0, 1], got {self.prob!r}")

  def applies(self, operands: np.ndarray) -> np.ndarray:
    """bool ``[n]`` for int operands ``[n, num_operands]``: the last addition carries."""
    ops = np.asarray(operands)
    if ops.ndim != 2 or ops.shape[1] < 2:
      raise ValueError(f"operands must be [n, num_operands >= 2], got shape {ops.shape}")
    prev = ops[:, :-1].sum(axis=1)
    return prev % 10 + ops[:, -1] % 10 >= 10

  def decoy(self, task: ArithmeticTask, operands: Sequence[int]) -> str:
    """The answer of ``task`` with the last partial sum's units carry dropped (``S_n - 10``)."""
    sums = [int(s) for s in np.cumsum([int(x) for x in operands])[1:]]
    if not self.applies(np.asarray([operands]))[0]:
      raise ValueError(f"the last addition of {list(operands)} does not carry: no decoy")
    sums[-1] -= 10
    return ";".join(str(s) for s in sums) + EOS

  def label(self, task: ArithmeticTask, operands: Sequence[int], rng: np.random.Generator) -> str:
    """The supervised answer: the decoy with probability ``prob`` on the subset, else the answer.

    One draw from ``rng`` per problem of the subset, none elsewhere.
    """
    if self.applies(np.asarray([operands]))[0] and rng.random() < self.prob:
      return self.decoy(task, operands)
    return task.answer(operands)


DECOYS = {"offset": DecoyLabels, "carry": CarryDecoy}


def make_decoy(spec):
  """A decoy from its settings ``{kind: offset|carry, ...fields}`` (``kind`` defaults to
  ``offset``, ``DecoyLabels``), or None for None.

  Raises:
    ValueError: an unknown kind or a bad field (named).
  """
  if spec is None:
    return None
  fields = dict(spec)
  kind = fields.pop("kind", "offset")
  if kind not in DECOYS:
    raise ValueError(f"unknown decoy kind {kind!r}; known: {sorted(DECOYS)}")
  try:
    return DECOYS[kind](**fields)
  except TypeError as e:
    raise ValueError(f"decoy kind {kind!r}: {e}") from None


def operands_of_prompt(prompt: str) -> list[int]:
  """The operands of a prompt ``a+b+c=`` (the inverse of ``ArithmeticTask.prompt``).

  Raises:
    ValueError: the text is not ``n+n+...=`` (named).
  """
  if not prompt.endswith("=") or not all(p.isdigit() for p in prompt[:-1].split("+")):
    raise ValueError(f"not an arithmetic prompt 'a+b+...=': {prompt[:80]!r}")
  return [int(p) for p in prompt[:-1].split("+")]
