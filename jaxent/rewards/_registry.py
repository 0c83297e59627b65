"""Named reward functions, looked up by the name a config gives.

A reward function maps one model response and one gold answer to a float,
``fn(response: str, answer: str) -> float``. Functions run either inline in
the calling thread (``isolated=False``: only for pure, linear-time checks such
as the arithmetic grader) or in a worker process of a ``GraderPool`` with a
per-item time bound (``isolated=True``: anything that parses model text with
a general parser, such as math-verify/sympy). Isolated functions are sent to
the workers by reference, so they must be module-level (picklable) functions.
"""
from __future__ import annotations

import dataclasses
import pickle
from typing import Callable

RewardFn = Callable[[str, str], float]


@dataclasses.dataclass(frozen=True)
class RewardSpec:
  """A registered reward function.

  Attributes:
    name: the name configs use.
    fn: ``fn(response, answer) -> float``.
    isolated: run in a grader worker process with a per-item timeout (True)
      or inline in the calling thread (False; the function must be bounded in
      time by construction).
  """
  name: str
  fn: RewardFn
  isolated: bool = True


_REGISTRY: dict[str, RewardSpec] = {}


def register_reward(name: str, fn: RewardFn, *, isolated: bool = True,
                    overwrite: bool = False) -> RewardSpec:
  """Registers ``fn`` under ``name`` and returns its spec.

  Raises:
    ValueError: ``name`` is empty or already registered (and not
      ``overwrite``), ``fn`` is not callable, or an isolated ``fn`` cannot be
      pickled by reference (a lambda or a nested function).
  """
  if not isinstance(name, str) or not name:
    raise ValueError(f"register_reward: name must be a non-empty str, got {name!r}")
  if not callable(fn):
    raise ValueError(f"register_reward: fn for {name!r} is not callable")
  if name in _REGISTRY and not overwrite:
    raise ValueError(f"register_reward: {name!r} is already registered")
  if isolated:
    try:
      pickle.dumps(fn)
    except Exception as e:  # pickle raises several unrelated types here
      raise ValueError(
          f"register_reward: isolated reward {name!r} must be a module-level "
          f"function (it is sent to worker processes by reference): {e}") from e
  spec = RewardSpec(name=name, fn=fn, isolated=bool(isolated))
  _REGISTRY[name] = spec
  return spec


def reward_names() -> tuple[str, ...]:
  """The registered reward names, sorted."""
  return tuple(sorted(_REGISTRY))


def reward_spec(name: str) -> RewardSpec:
  """The spec registered under ``name``.

  Raises:
    ValueError: unknown name; the message lists the registered names.
  """
  try:
    return _REGISTRY[name]
  except (KeyError, TypeError):
    raise ValueError(
        f"unknown reward {name!r}; registered rewards: "
        f"{', '.join(reward_names())}") from None


def get_reward(name: str) -> RewardFn:
  """The reward function registered under ``name`` (ValueError if unknown)."""
  return reward_spec(name).fn
