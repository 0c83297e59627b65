"""Text tables of evaluation reports and of the presets."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

from jaxent.eval._settings import PRESETS


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
