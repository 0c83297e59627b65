"""Math answers graded with math-verify.

``math_reward(response, answer)`` takes the response's final answer, the
content of its last ``\\boxed{...}`` (math-verify alone would merge every
boxed answer of a response into a set: ``\\boxed{3} no, \\boxed{4}`` would
read as ``{3, 4}``), or, without a complete box, whatever math-verify extracts
from the whole response (LaTeX and plain expressions, "The final answer is
..." patterns). It checks that against the gold answer symbolically and
numerically (``math_verify.verify``: ``\\boxed{1/2}`` equals ``0.5`` and
``\\frac{1}{2}``).

Safety. Model text reaches only math-verify's own parser: its LaTeX path
(latex2sympy, an ANTLR grammar) builds sympy objects without evaluating code,
and its plain-expression path calls sympy's ``parse_expr`` only on strings its
regex has restricted to digits, ``. + - * / ^ ( ) × ÷`` and whitespace, so no
name can be looked up or called. This module never calls eval/exec/sympify.

Time. math-verify bounds its own work with ``signal.alarm``, which works only
on a process's main thread and not at all inside C code (a huge power in
gmpy/sympy). Both its timeouts are disabled here (``parsing_timeout=None``,
``timeout_seconds=None``); the bound is enforced from outside by
``GraderPool``, which kills a worker process that overruns. Called directly,
this function is unbounded in time: go through ``grade_batch``.
"""
from __future__ import annotations

import functools
import logging

_loaded = None


def _math_verify():
  """math-verify's (parse, verify), imported on first use.

  The import (sympy, the ANTLR LaTeX parser) takes about a second; the
  process that only dispatches to workers never pays it.
  """
  global _loaded
  if _loaded is None:
    from math_verify import parse, verify  # pylint: disable=g-import-not-at-top
    # With its timeouts disabled math-verify logs a warning that the caller
    # must bound time itself; GraderPool does, so the warning is noise.
    for name in ("math_verify", "math_verify.parser", "math_verify.grader"):
      logging.getLogger(name).setLevel(logging.ERROR)
    _loaded = (parse, verify)
  return _loaded


@functools.lru_cache(maxsize=4096)
def _parse_gold(answer: str) -> tuple:
  """The parsed gold answer (cached: a group of n responses shares one gold).

  Dataset golds are usually bare LaTeX (``\\frac{\\sqrt3}{2}``) which
  math-verify only recognises inside math delimiters, so a gold without
  delimiters is tried as ``\\boxed{gold}`` first, then as written.
  """
  parse, _ = _math_verify()
  text = answer.strip()
  candidates = [text]
  if "\\boxed" not in text and "$" not in text and "\\(" not in text and "\\[" not in text:
    candidates.insert(0, "\\boxed{" + text + "}")
  for c in candidates:
    parsed = parse(c, parsing_timeout=None)
    if parsed:
      return tuple(parsed)
  return ()


_BOXED = "\\boxed"


def last_boxed(text: str) -> str | None:
  """``\\boxed{...}`` of the last box in ``text`` (braces balanced), or None.

  One backward search and one forward scan: linear time on any input.
  """
  start = text.rfind(_BOXED)
  if start < 0:
    return None
  i = start + len(_BOXED)
  while i < len(text) and text[i] == " ":
    i += 1
  if i >= len(text) or text[i] != "{":
    return None
  depth = 0
  for j in range(i, len(text)):
    c = text[j]
    if c == "{":
      depth += 1
    elif c == "}":
      depth -= 1
      if depth == 0:
        return text[start:j + 1]
  return None  # unbalanced: a truncated response


def math_reward(response: str, answer: str) -> float:
  """1.0 if math-verify finds the response's final answer equal to the gold.

  Raises:
    ValueError: the gold answer cannot be parsed (a dataset problem; graded 0
      and counted as a failure by ``grade_batch``).
  """
  parse, verify = _math_verify()
  gold = _parse_gold(answer)
  if not gold:
    raise ValueError(f"math gold answer could not be parsed: {answer[:80]!r}")
  boxed = last_boxed(response)
  pred = parse(response if boxed is None else boxed, parsing_timeout=None)
  if not pred:
    return 0.0
  return 1.0 if verify(list(gold), pred, timeout_seconds=None) else 0.0


def warm_up() -> None:
  """Imports math-verify and grades one item, so later items run warm."""
  math_reward("\\boxed{\\frac{1}{2}}", "0.5")
