"""Benchmark files: a spec (``NAME=PATH`` or ``PATH``) resolved to its settings and fields.

Explicit settings override a preset's, and every report records the settings
actually used (``Benchmark.overrides``, ``Benchmark.notes``).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping, Sequence

from jaxent import data as data_lib
from jaxent.errors import InputFileError
from jaxent.files import open_regular, require_regular
from jaxent.eval._settings import (DECODING_FIELDS, PRESETS, EvalSettings, _is_int, preset_for_file,
                                   preset_for_name)


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


# The field names are read from the first JSON object line; a line read for
# that is cut at this many bytes (a longer one is then not JSON and is passed
# over, as the loader skips it).
_MAX_FIELD_LINE_BYTES = 16 << 20


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
  try:
    require_regular(path, "benchmark file")
  except FileNotFoundError:
    raise data_lib.DataError(f"benchmark file not found: {path!r}") from None
  except OSError as e:  # InputFileError: a directory, FIFO, device or socket
    raise data_lib.DataError(str(e) if isinstance(e, InputFileError) else
                             f"cannot read benchmark file {path!r}: {e.strerror or e}") from None
  if not path.endswith((".jsonl", ".parquet")):
    raise data_lib.DataError(f"unsupported benchmark file {path!r}: expected .jsonl or .parquet")
  first = None
  if path.endswith(".parquet"):
    try:
      import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
      names = pq.read_schema(require_regular(path, "benchmark file")).names
    except (ImportError, OSError, ValueError) as e:
      raise data_lib.DataError(f"cannot read benchmark file {path!r}: {e}") from e
    first = ("row 0", {n: None for n in names})
  else:
    try:
      with open_regular(path, "rb", what="benchmark file") as f:
        for n, raw in enumerate(iter(lambda: f.readline(_MAX_FIELD_LINE_BYTES), b""), start=1):
          if not raw.endswith(b"\n") and len(raw) == _MAX_FIELD_LINE_BYTES:
            while (rest := f.readline(1 << 20)) and not rest.endswith(b"\n"):
              pass  # the rest of an over-long line, discarded
            continue
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
