"""How a benchmark is decoded, graded and read (``EvalSettings``), and the paper's presets.

Presets (``PRESETS``) hold the paper's evaluation (Cui et al. 2025; see
``../shared/REFERENCE.md``): AIME24, AIME25 and AMC at temperature 0.6 with
the mean of 32 samples, MATH-500 greedy; responses up to 8192 tokens and
prompts up to 2048 (the paper's maximum response and prompt lengths); top-p 1
(no truncation: the paper states none for evaluation). A benchmark is
recognised by an explicit name or by its file name (``aime24.jsonl``,
``AIME_2025.jsonl``, ``math-500.jsonl``, ``amc23.jsonl``).
"""
from __future__ import annotations

import dataclasses
import os
import re

import numpy as np

from jaxent import rewards
from jaxent.config import check_decoding

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
    check_decoding(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
    if self.temperature == 0 and self.k != 1:
      raise ValueError(f"k={self.k} with temperature 0: greedy decoding gives one sample per "
                       f"prompt (k=1); use a temperature > 0 for mean@k")
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
