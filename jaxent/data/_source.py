"""Reading, validating and tokenizing prompt rows.

Rows come from local JSONL files (one JSON object per line), Parquet files
(when pyarrow is installed) or an in-memory sequence of dicts. Every row needs
a prompt and an answer field. Rows that cannot be used are skipped and
counted in ``DataStats``; a source that cannot be read, or yields no usable
row at all, raises ``DataError`` naming the file.

Everything is read and tokenized once, up front: the valid rows must be
known before shuffling and sharding (every process must agree on the same
list), and the counts are then exact from step 0. Token ids are kept as int32
arrays (4 bytes a token, not a Python int object each).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from typing import Any, Iterator, Mapping, NamedTuple, Sequence

import numpy as np

from jaxent.errors import DataError, InputFileError
from jaxent.data._template import TEMPLATE_TIMEOUT_S, TemplateTimeout, TemplateTooLong, render_chat
from jaxent.files import open_regular, require_regular

_log = logging.getLogger(__name__)

# Only the first few skipped rows are logged individually.
_MAX_LOGGED = 5

OVERLONG_MODES = ("skip", "truncate_left")

# Prompts are bounded in characters before they are tokenized, so that one
# huge row costs no more than an ordinary one (a 5 MB prompt takes about
# 1.5 GB to tokenize). No tokenizer averages more than this many characters
# a token on text (about 4 is usual; a long run of one character can merge
# into tokens of up to a few dozen), so a prompt over
# ``max_prompt_len * MAX_CHARS_PER_TOKEN`` characters is overlong whatever
# the tokenizer.
MAX_CHARS_PER_TOKEN = 32
# A JSONL line may hold the prompt (up to 6 bytes a character, as a JSON
# escape) and other fields; longer lines are skipped unparsed.
_LINE_SLACK_BYTES = 1 << 20
# Characters a chat template may add around the prompt and system turn.
_TEMPLATE_SLACK_CHARS = 1 << 16


def max_prompt_chars(max_prompt_len: int) -> int:
  """The longest prompt text tokenized: ``max_prompt_len * MAX_CHARS_PER_TOKEN`` characters."""
  return max_prompt_len * MAX_CHARS_PER_TOKEN


def max_line_bytes(max_prompt_len: int) -> int:
  """The longest JSONL line parsed: 6 bytes per prompt character plus 1 MiB."""
  return 6 * max_prompt_chars(max_prompt_len) + _LINE_SLACK_BYTES


@dataclasses.dataclass(frozen=True)
class DataStats:
  """What happened to each row read. ``rows`` = ``valid`` + all skips.

  Attributes:
    rows: non-blank rows read.
    valid: rows kept.
    malformed: not JSON, not valid UTF-8, or not a JSON object.
    missing_field: the prompt or answer field is absent.
    wrong_type: the prompt is not a string, or the answer is not a string or
      a number.
    empty: the prompt or answer is empty (after stripping whitespace).
    tokenize_error: the tokenizer or chat template raised on the row.
    oversized: rows skipped before tokenization: a JSONL line longer than
      ``max_line_bytes(max_prompt_len)`` (not parsed), or, with
      ``overlong="skip"``, a prompt longer than
      ``max_prompt_chars(max_prompt_len)`` characters.
    overlong: prompts longer than ``max_prompt_len`` tokens, skipped
      (``overlong="skip"``).
    truncated: prompts longer than ``max_prompt_len`` tokens, kept with only
      their last ``max_prompt_len`` tokens (``overlong="truncate_left"``;
      these are also counted in ``valid``).
  """
  rows: int = 0
  valid: int = 0
  malformed: int = 0
  missing_field: int = 0
  wrong_type: int = 0
  empty: int = 0
  tokenize_error: int = 0
  oversized: int = 0
  overlong: int = 0
  truncated: int = 0

  @property
  def skipped(self) -> int:
    return self.rows - self.valid

  def as_dict(self) -> dict[str, int]:
    """Counters for logging, keys prefixed ``data_``."""
    d = {f"data_{k}": v for k, v in dataclasses.asdict(self).items()}
    d["data_skipped"] = self.skipped
    return d


@dataclasses.dataclass(frozen=True)
class Example:
  """One valid row.

  Attributes:
    index: 0-based position of the row in the concatenated input: for JSONL
      the line number minus one (blank lines included), plus the line counts
      of the files before it; for records, the position in the sequence.
    prompt: the prompt text as in the file.
    answer: the gold answer (numbers are converted with ``str``).
    prompt_ids: int32 ``[L]``, ``L <= max_prompt_len``: the tokenized prompt
      (chat template applied if asked).
  """
  index: int
  prompt: str
  answer: str
  prompt_ids: np.ndarray


@dataclasses.dataclass(frozen=True)
class PromptSet:
  """The valid examples of a dataset and the counts of what was skipped."""
  examples: tuple[Example, ...]
  stats: DataStats
  fingerprint: str  # sha256 over indices, texts and token ids

  def __len__(self) -> int:
    return len(self.examples)


class _Oversized(NamedTuple):
  """A line longer than the reader's bound, skipped unread (its length in bytes)."""
  nbytes: int


def _read_lines(f, max_line_bytes: int):
  """Yields each line of ``f`` (bytes), or ``_Oversized`` for a line longer than
  ``max_line_bytes``: such a line is consumed in chunks, never held whole."""
  while True:
    raw = f.readline(max_line_bytes + 1)
    if not raw:
      return
    if len(raw) <= max_line_bytes or raw.endswith(b"\n"):
      yield raw
      continue
    n = len(raw)
    while not raw.endswith(b"\n"):
      raw = f.readline(1 << 20)
      if not raw:
        break
      n += len(raw)
    yield _Oversized(n)


def _iter_jsonl(path: str, offset: int, max_line_bytes: int):
  """Yields ``(offset + line_index, where, parsed_or_exception)`` per non-blank
  line (``_Oversized`` for a line over ``max_line_bytes``); returns the number
  of lines."""
  try:
    f = open_regular(path, "rb", what="dataset file")
  except InputFileError as e:
    raise DataError(str(e)) from e
  except OSError as e:
    raise DataError(f"cannot read dataset file {path!r}: {e.strerror or e}") from e
  n = 0
  with f:
    try:
      for n, raw in enumerate(_read_lines(f, max_line_bytes), start=1):
        if isinstance(raw, _Oversized):
          yield offset + n - 1, f"{path}:{n}", raw
          continue
        if not raw.strip():
          continue
        try:
          row = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
          row = e
        yield offset + n - 1, f"{path}:{n}", row
    except OSError as e:  # an I/O error mid-file
      raise DataError(f"cannot read dataset file {path!r}: {e.strerror or e}") from e
  return n


def _iter_parquet(path: str, offset: int):
  """Like ``_iter_jsonl`` for a Parquet file (needs pyarrow)."""
  try:
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise DataError(
        f"cannot read {path!r}: Parquet needs pyarrow, which is not installed "
        f"(pip install pyarrow), or convert the file to JSONL") from e
  try:
    rows = pq.read_table(require_regular(path, "dataset file")).to_pylist()
  except (OSError, ValueError) as e:  # pyarrow raises ArrowInvalid(ValueError)
    raise DataError(f"cannot read dataset file {path!r}: {e}") from e
  for i, row in enumerate(rows):
    yield offset + i, f"{path}:row {i}", row
  return len(rows)


def _is_records(source) -> bool:
  return (not isinstance(source, (str, os.PathLike)) and len(source) > 0
          and all(isinstance(s, Mapping) for s in source))


def _iter_rows(source, max_line_bytes: int = 1 << 30) -> Iterator[tuple[int, str, Any]]:
  """``(index, where, row)``; row is a dict, another value, an exception, or
  ``_Oversized``."""
  if _is_records(source):
    for i, row in enumerate(source):
      yield i, f"record {i}", row
    return
  paths = [source] if isinstance(source, (str, os.PathLike)) else list(source)
  offset = 0
  for path in paths:
    if not isinstance(path, (str, os.PathLike)):
      raise DataError(
          f"dataset source must be file paths or dict records, got {type(path).__name__}")
    path = os.fspath(path)
    try:
      require_regular(path, "dataset file")
    except FileNotFoundError:
      raise DataError(f"dataset file not found: {path!r}") from None
    except InputFileError as e:
      raise DataError(str(e)) from None
    except OSError as e:
      raise DataError(f"cannot read dataset file {path!r}: {e.strerror or e}") from None
    if path.endswith(".parquet"):
      offset += yield from _iter_parquet(path, offset)
    elif path.endswith(".jsonl"):
      offset += yield from _iter_jsonl(path, offset, max_line_bytes)
    else:
      raise DataError(f"unsupported dataset file {path!r}: expected .jsonl or .parquet")


def _encode(tokenizer, text: str, *, add_special_tokens: bool) -> list[int]:
  ids = tokenizer.encode(text, add_special_tokens=add_special_tokens)
  if isinstance(ids, Mapping):  # some tokenizers return a BatchEncoding
    ids = ids["input_ids"]
  return list(ids)


def tokenize_prompt(tokenizer, prompt: str, *, chat_template: bool,
                    system_prompt: str | None = None,
                    template_timeout_s: float = TEMPLATE_TIMEOUT_S,
                    max_template_chars: int | None = None) -> list[int]:
  """Token ids of one prompt.

  With ``chat_template``: the prompt as a user turn (after an optional
  system turn) through ``tokenizer.apply_chat_template(...,
  add_generation_prompt=True)``, rendered to text and then encoded without
  adding special tokens again (the template holds them). Otherwise the plain
  prompt through ``tokenizer.encode`` with the tokenizer's own special tokens
  (e.g. Llama's BOS).
  """
  if not chat_template:
    return _encode(tokenizer, prompt, add_special_tokens=True)
  messages = []
  if system_prompt is not None:
    messages.append({"role": "system", "content": system_prompt})
  messages.append({"role": "user", "content": prompt})
  limit = max_template_chars
  if limit is None:
    limit = len(prompt) + len(system_prompt or "") + _TEMPLATE_SLACK_CHARS
  text = render_chat(tokenizer, messages, timeout_s=template_timeout_s, max_chars=limit)
  return _encode(tokenizer, text, add_special_tokens=False)


def load_prompts(source: str | os.PathLike | Sequence, tokenizer, *,
                 prompt_key: str = "prompt", answer_key: str = "answer",
                 max_prompt_len: int = 1024, overlong: str = "skip",
                 chat_template: bool = False,
                 system_prompt: str | None = None) -> PromptSet:
  """Reads, validates and tokenizes every row of ``source``.

  Args:
    source: a path (``.jsonl``; ``.parquet`` with pyarrow), a sequence of
      paths (concatenated in order), or a sequence of dict records.
    tokenizer: anything with ``encode(text, add_special_tokens=...)`` (an HF
      tokenizer, or ``jaxent.data.arithmetic.CharTokenizer``); with
      ``chat_template`` also ``apply_chat_template``.
    prompt_key, answer_key: the field names.
    max_prompt_len: the longest prompt kept, in tokens. Rows are bounded
      before tokenization too: a JSONL line over ``max_line_bytes`` is
      skipped unparsed, and a prompt over ``max_prompt_chars`` characters is
      skipped (``"skip"``) or cut to its last ``max_prompt_chars``
      characters (``"truncate_left"``) before it is tokenized.
    overlong: ``"skip"`` drops longer prompts (counted as ``overlong``, or
      ``oversized`` when caught by the character bound);
      ``"truncate_left"`` keeps their last ``max_prompt_len`` tokens (counted
      as ``truncated``; ``Example.prompt`` is then the text tokenized): the
      end of a prompt (the question, the generation prompt of a chat
      template) matters most to the response.
    chat_template: apply the tokenizer's chat template.
    system_prompt: an optional system turn (only with ``chat_template``).

  Raises:
    DataError: a file is missing, unreadable or not a regular file; no row
      is valid (the message names the source and the counts); or the chat
      template runs past its time bound or produces far more text than the
      prompt (the template is at fault, not a row).
    ValueError: a bad argument (named).
  """
  if not isinstance(max_prompt_len, int) or isinstance(max_prompt_len, bool) or max_prompt_len < 1:
    raise ValueError(f"max_prompt_len must be an int >= 1, got {max_prompt_len!r}")
  if overlong not in OVERLONG_MODES:
    raise ValueError(f"overlong must be one of {OVERLONG_MODES}, got {overlong!r}")
  if not prompt_key or not answer_key:
    raise ValueError("prompt_key and answer_key must be non-empty strings")
  if system_prompt is not None and not chat_template:
    raise ValueError("system_prompt needs chat_template=True")
  if chat_template:
    if not hasattr(tokenizer, "apply_chat_template") or not getattr(tokenizer, "chat_template", None):
      raise ValueError("chat_template=True but the tokenizer has no chat template")

  counts = {f.name: 0 for f in dataclasses.fields(DataStats)}
  examples: list[Example] = []
  digest = hashlib.sha256()
  logged = 0
  first_error = None

  def skip(kind: str, where: str, why: str) -> None:
    nonlocal logged, first_error
    counts[kind] += 1
    if first_error is None:
      first_error = f"{where}: {why}"
    if logged < _MAX_LOGGED:
      logged += 1
      _log.warning("skipping dataset row %s: %s", where, why)

  char_bound = max_prompt_chars(max_prompt_len)
  for index, where, row in _iter_rows(source, max_line_bytes(max_prompt_len)):
    counts["rows"] += 1
    if isinstance(row, _Oversized):
      skip("oversized", where, f"line of {row.nbytes} bytes > {max_line_bytes(max_prompt_len)} "
           f"(the bound for max_prompt_len={max_prompt_len}); not parsed")
      continue
    if isinstance(row, Exception):
      skip("malformed", where, f"not valid JSON ({type(row).__name__})")
      continue
    if not isinstance(row, Mapping):
      skip("malformed", where, f"not a JSON object ({type(row).__name__})")
      continue
    if prompt_key not in row or answer_key not in row:
      missing = [k for k in (prompt_key, answer_key) if k not in row]
      skip("missing_field", where, f"missing field {missing[0]!r}")
      continue
    prompt, answer = row[prompt_key], row[answer_key]
    if not isinstance(prompt, str):
      skip("wrong_type", where, f"{prompt_key!r} is {type(prompt).__name__}, not str")
      continue
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
      answer = str(answer)
    if not isinstance(answer, str):
      skip("wrong_type", where, f"{answer_key!r} is {type(answer).__name__}, not str or number")
      continue
    if not prompt.strip() or not answer.strip():
      skip("empty", where, f"empty {prompt_key if not prompt.strip() else answer_key!r}")
      continue
    cut = len(prompt) > char_bound
    if cut:
      if overlong == "skip":
        skip("oversized", where, f"prompt has {len(prompt)} characters > {char_bound} "
             f"(max_prompt_len={max_prompt_len} x {MAX_CHARS_PER_TOKEN}); not tokenized")
        continue
      prompt = prompt[-char_bound:]
    try:
      ids = tokenize_prompt(tokenizer, prompt, chat_template=chat_template,
                            system_prompt=system_prompt)
    except (TemplateTimeout, TemplateTooLong) as e:
      what = (f"did not finish within {TEMPLATE_TIMEOUT_S:g} s (a template renders in well "
              f"under a millisecond)" if isinstance(e, TemplateTimeout)
              else str(e).replace("the chat template ", "", 1))
      raise DataError(f"the tokenizer's chat template {what} on {where}; refusing the "
                      f"template") from None
    except Exception as e:  # pylint: disable=broad-except
      # tokenizers raise many types (e.g. on lone surrogates); one bad row
      # must not stop the run
      skip("tokenize_error", where, f"tokenizer failed: {type(e).__name__}: {e}")
      continue
    if not ids:
      skip("empty", where, "prompt tokenizes to nothing")
      continue
    if len(ids) > max_prompt_len:
      if overlong == "skip":
        skip("overlong", where, f"prompt has {len(ids)} tokens > max_prompt_len={max_prompt_len}")
        continue
      ids = ids[-max_prompt_len:]
      cut = True
    if cut:
      counts["truncated"] += 1
    arr = np.asarray(ids, np.int32)
    examples.append(Example(index=index, prompt=prompt, answer=answer, prompt_ids=arr))
    digest.update(f"{index}\x00{len(prompt)}\x00{prompt}\x00{len(answer)}\x00{answer}\x00".encode(
        "utf-8", "surrogatepass"))
    digest.update(arr.tobytes())

  counts["valid"] = len(examples)
  stats = DataStats(**counts)
  if not examples:
    if isinstance(source, (str, os.PathLike)):
      name = os.fspath(source)
    else:
      name = "records" if _is_records(source) else ", ".join(map(os.fspath, source))
    detail = f"; first problem: {first_error}" if first_error else ""
    raise DataError(f"dataset {name} has no valid rows ({stats.rows} rows read, "
                    f"counts {stats.as_dict()}){detail}")
  if stats.skipped:
    _log.warning("dataset: kept %d of %d rows; skipped %s", stats.valid, stats.rows,
                 {k: v for k, v in stats.as_dict().items() if v and k not in (
                     "data_rows", "data_valid", "data_truncated", "data_skipped")})
  return PromptSet(examples=tuple(examples), stats=stats, fingerprint=digest.hexdigest())
