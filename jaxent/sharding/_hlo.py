"""Reading collective traffic out of compiled HLO text.

Used by tests and benchmarks to check that a sharded program moves only what
it should (e.g. the two-stage top-k exchanges ``devices * k`` candidates,
never the token array).
"""
from __future__ import annotations

import math
import re

GATHERING_COLLECTIVES = ("all-gather", "all-to-all", "collective-permute")

# "%name = <result shape(s)> op(" ; async collectives appear as "op-start(".
_OP = re.compile(r"=\s*(.*?)\s+(all-gather|all-to-all|collective-permute|all-reduce|"
                 r"reduce-scatter)(?:-start)?\(")
_SHAPE = re.compile(r"\b(?:pred|[suf]\d+|bf16|f8e\w+)\[([\d,]*)\]")


def collective_sizes(hlo_text: str, ops=GATHERING_COLLECTIVES) -> list[tuple[str, int]]:
  """``(op, elements)`` for each collective of kind ``ops`` in compiled HLO.

  ``elements`` is the largest array in the op's result (an async ``-start``
  op's result tuple holds its operand and result; the result is the larger
  for a gather). Pass ``jax.jit(f).lower(...).compile().as_text()``.
  """
  out = []
  for line in hlo_text.splitlines():
    m = _OP.search(line)
    if not m or m.group(2) not in ops:
      continue
    sizes = [math.prod(int(d) for d in dims.split(",") if d) for dims in _SHAPE.findall(m.group(1))]
    out.append((m.group(2), max(sizes, default=0)))
  return out
