"""Exact graders for generated tasks (pure, linear-time: run inline).

The arithmetic task (``jaxent.data.arithmetic``) asks ``ab+cd+ef=`` and wants
the response ``S1;S2$``: the running partial sums separated by ``;`` and
terminated by the end-of-sequence character ``$``. Only regular expressions
anchored at both ends and integer comparison of digit strings are used:
nothing in the response is evaluated.
"""
from __future__ import annotations

import re

# digits, then any number of ";digits". Anchored with fullmatch, no nested
# quantifiers over overlapping classes, so matching is linear in the length.
_SUMS_RE = re.compile(r"[0-9]+(?:;[0-9]+)*")
EOS = "$"


def _parse_sums(text: str) -> list[str] | None:
  """Digit strings of ``S1;...;Sk`` before the first ``$``; None if malformed.

  A text without ``$`` is an unterminated (truncated) response: None.
  """
  end = text.find(EOS)
  if end < 0:
    return None
  body = text[:end]
  if _SUMS_RE.fullmatch(body) is None:
    return None
  return body.split(";")


def _parse_gold(answer: str) -> list[str]:
  """The gold sums; a gold without ``$`` (e.g. just ``"102"``) is accepted."""
  text = answer.strip()
  if EOS not in text:
    text += EOS
  sums = _parse_sums(text)
  if sums is None:
    raise ValueError(f"arithmetic gold answer is malformed: {answer[:80]!r}")
  return sums


def _same_number(a: str, b: str) -> bool:
  # Leading zeros do not change the number; compare digit strings, not ints,
  # so a megabyte of digits costs linear time and no big-int conversion.
  return a.lstrip("0") == b.lstrip("0")


def arithmetic_exact(response: str, answer: str, *, partial_credit: bool = False) -> float:
  """Reward of an arithmetic response ``S1;...;Sk$`` against the gold answer.

  Without partial credit: 1 if the response is well formed (digits separated
  by ``;``, terminated by ``$``) and its final sum ``Sk`` (after the last
  ``;``, before ``$``) equals the gold's final sum; else 0. With partial
  credit: the fraction of the gold's ``k`` sums matched position by position
  (1 only when every sum, the final one included, is right).
  """
  gold = _parse_gold(answer)
  pred = _parse_sums(response)
  if pred is None:
    return 0.0
  if not partial_credit:
    return 1.0 if _same_number(pred[-1], gold[-1]) else 0.0
  if len(pred) != len(gold):
    # a wrong number of steps still earns the matching leading steps, but
    # never full credit
    hits = sum(_same_number(p, g) for p, g in zip(pred, gold))
    return min(hits, len(gold) - 1) / len(gold)
  return sum(_same_number(p, g) for p, g in zip(pred, gold)) / len(gold)


def arithmetic_partial(response: str, answer: str) -> float:
  """``arithmetic_exact`` with partial credit."""
  return arithmetic_exact(response, answer, partial_credit=True)


def exact_match(response: str, answer: str) -> float:
  """1 if the response equals the answer after stripping whitespace, else 0."""
  return 1.0 if response.strip() == answer.strip() else 0.0
