"""Chat templates rendered under a time bound and an output-size bound.

A chat template is Jinja code shipped in a model directory's
``tokenizer_config.json``. transformers renders it in its sandboxed Jinja
environment (``ImmutableSandboxedEnvironment``: no attribute access to
Python internals, no mutation of the inputs, ``range`` capped at 100,000
items), which stops a template from escaping but not from running forever:
three nested ``range(100000)`` loops are 10^15 iterations. Rendering here is
``tokenizer.apply_chat_template`` itself (the exact text transformers
produces) under a deadline: one shared watchdog thread raises
``TemplateTimeout`` in the rendering thread when the deadline passes
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
import time
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


class _Watchdog:
  """One daemon thread that posts ``TemplateTimeout`` to threads past their deadline.

  Shared by every ``_Deadline`` (a thread per rendering would cost more than
  the rendering). Arming and disarming happen under the condition's lock,
  and so does posting: either a block disarmed first (nothing is posted), or
  the exception was posted and the block learns it when it disarms.
  """

  def __init__(self):
    self._cv = threading.Condition()
    self._armed: dict[int, tuple[int, float]] = {}  # token -> (thread id, deadline)
    self._posted: set[int] = set()
    self._next = 0
    self._thread = None

  def arm(self, timeout_s: float) -> int:
    with self._cv:
      if self._thread is None:
        self._thread = threading.Thread(target=self._run, name="jaxent-template-deadline",
                                        daemon=True)
        self._thread.start()
      self._next += 1
      self._armed[self._next] = (threading.get_ident(), time.monotonic() + timeout_s)
      self._cv.notify()
      return self._next

  def disarm(self, token: int) -> bool:
    """Whether the exception was posted to the block's thread."""
    with self._cv:
      self._armed.pop(token, None)
      if token in self._posted:
        self._posted.discard(token)
        return True
      return False

  def _run(self) -> None:
    with self._cv:
      while True:
        now = time.monotonic()
        for token, (tid, deadline) in list(self._armed.items()):
          if deadline <= now:
            del self._armed[token]
            if _set_async_exc(tid, TemplateTimeout) == 1:
              self._posted.add(token)
        wait = min((d for _, d in self._armed.values()), default=now + 3600.0) - now
        self._cv.wait(timeout=max(wait, 0.0))


_WATCHDOG = _Watchdog()


class _Deadline:
  """Raises ``TemplateTimeout`` in the thread that entered it once ``timeout_s`` has passed.

  A posted exception that the block did not receive before it finished is
  withdrawn on exit, so it never surfaces later in unrelated code.
  """

  def __init__(self, timeout_s: float):
    self.timeout_s = timeout_s

  def __enter__(self):
    self._token = _WATCHDOG.arm(self.timeout_s)
    return self

  def __exit__(self, exc_type, exc, tb):
    if _WATCHDOG.disarm(self._token) and exc_type is not TemplateTimeout:
      _set_async_exc(threading.get_ident(), None)  # posted but not delivered: withdraw it
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
