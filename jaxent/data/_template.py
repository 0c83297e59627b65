"""Chat templates rendered under a time bound and an output-size bound.

A chat template is Jinja code shipped in a model directory's
``tokenizer_config.json``. transformers renders it in its sandboxed Jinja
environment (``ImmutableSandboxedEnvironment``: no attribute access to
Python internals, no mutation of the inputs, ``range`` capped at 100,000
items), which stops a template from escaping but not from running forever:
three nested ``range(100000)`` loops are 10^15 iterations. Rendering here is
``tokenizer.apply_chat_template`` itself (the exact text transformers
produces) under a deadline: a watchdog thread raises ``TemplateTimeout`` in
the rendering thread when the deadline passes
(``PyThreadState_SetAsyncExc``, delivered between bytecodes, so it stops any
loop of the Python code Jinja compiles a template to). A rendering longer
than its bound is refused after it returns; the time bound limits how much a
template can produce before that.

Limit: a single C-level operation is not interrupted (one
``'x' * 10**9``: the sandbox allows it; it allocates once, then the output
bound refuses it).
"""
from __future__ import annotations

import ctypes
import threading
from typing import Sequence

# The default bound on one rendering. Real templates render in well under a
# millisecond; the margin is for a loaded host.
TEMPLATE_TIMEOUT_S = 2.0


class TemplateTimeout(Exception):
  """Raised in the rendering thread when a chat template runs past its deadline."""


class TemplateTooLong(Exception):
  """A chat template's output exceeded its bound."""


def _set_async_exc(thread_id: int, exc) -> int:
  return ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id),
                                                    ctypes.py_object(exc) if exc else None)


class _Deadline:
  """Raises ``TemplateTimeout`` in the thread that entered it once ``timeout_s`` has passed.

  The watchdog and the exiting thread agree under a lock: either the body
  finished first (the watchdog does nothing), or the exception was posted;
  a posted exception that the body did not receive before it finished is
  cleared on exit, so it never surfaces later in unrelated code.
  """

  def __init__(self, timeout_s: float):
    self.timeout_s = timeout_s
    self._lock = threading.Lock()
    self._done = False
    self._posted = False

  def _fire(self) -> None:
    with self._lock:
      if not self._done:
        self._posted = _set_async_exc(self._tid, TemplateTimeout) == 1

  def __enter__(self):
    self._tid = threading.get_ident()
    self._timer = threading.Timer(self.timeout_s, self._fire)
    self._timer.daemon = True
    self._timer.start()
    return self

  def __exit__(self, exc_type, exc, tb):
    self._timer.cancel()
    with self._lock:
      self._done = True
      if self._posted and exc_type is not TemplateTimeout:
        _set_async_exc(self._tid, None)  # posted but not delivered: withdraw it
    return False


def render_chat(tokenizer, messages: Sequence[dict], *, timeout_s: float = TEMPLATE_TIMEOUT_S,
                max_chars: int) -> str:
  """``tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)``,
  bounded.

  Raises:
    TemplateTimeout: the template ran longer than ``timeout_s`` seconds.
    TemplateTooLong: it produced more than ``max_chars`` characters.
    Exception: whatever the template or the tokenizer raised (e.g. the
      template's own ``raise_exception`` on a role it does not accept).
  """
  with _Deadline(timeout_s):
    text = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
  if not isinstance(text, str):
    raise TypeError(f"apply_chat_template returned {type(text).__name__}, not str")
  if len(text) > max_chars:
    raise TemplateTooLong(f"the chat template produced {len(text)} characters (bound {max_chars})")
  return text
