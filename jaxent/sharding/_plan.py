"""Planning a device mesh: ``--mesh`` text, ``-1`` axes, and the checks made before a run.

One place decides the mesh a job runs on, for training (``plan_mesh``, from
the run config and its batch) and for evaluation or any job without a
training batch (``plan_shape``, from explicit sizes such as ``parse_mesh``'s).
Each rule a layout must satisfy is checked here, and each violation is a
``ConfigError`` whose message names the numbers: at most one axis is ``-1``
and takes the devices the others leave; the mesh uses every device, or with
one process the first ones (``MeshPlan.note`` says so); a micro-batch's rows
split over ``data * fsdp``; ``tensor`` divides the attention and KV heads.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from jaxent.config import Config
from jaxent.errors import ConfigError
from jaxent.sharding._mesh import make_mesh
from jaxent.types import MESH_AXES as AXES


def parse_mesh(text: str) -> tuple[int, int, int]:
  """``"data=D,fsdp=F,tensor=T"`` -> ``(D, F, T)``.

  Any omitted axis is 1; one axis may be -1 (the devices the others leave,
  resolved by ``plan_shape``, which also refuses a second -1): ``"fsdp=8"`` -> (1, 8, 1), ``"data=-1,tensor=2"``
  -> (-1, 1, 2).

  Raises:
    ValueError: naming the part, axis or size that is wrong.
  """
  sizes: dict[str, int] = {}
  parts = [p.strip() for p in str(text).split(",")]
  if not any(parts):
    raise ValueError("no axis given; expected data=D,fsdp=F,tensor=T")
  for part in parts:
    name, sep, value = (x.strip() for x in part.partition("="))
    if not sep or not name:
      raise ValueError(f"{part!r} is not AXIS=SIZE (axes: {', '.join(AXES)})")
    if name not in AXES:
      raise ValueError(f"unknown axis {name!r} (axes: {', '.join(AXES)})")
    if name in sizes:
      raise ValueError(f"axis {name} given twice")
    try:
      v = int(value)
    except ValueError:
      raise ValueError(f"{name}={value!r}: a size must be an integer >= 1, or -1") from None
    if v != -1 and v < 1:
      raise ValueError(f"{name}={v}: a size must be >= 1, or -1 (the remaining devices)")
    sizes[name] = v
  return tuple(sizes.get(a, 1) for a in AXES)  # type: ignore[return-value]


@dataclasses.dataclass(frozen=True)
class MeshPlan:
  """The mesh a run will use, resolved from ``cfg.mesh`` and the device count."""
  shape: tuple[int, int, int]  # (data, fsdp, tensor)
  available: int               # devices of the whole job
  note: str | None = None      # set when the run uses fewer devices than are available

  @property
  def size(self) -> int:
    return math.prod(self.shape)

  @property
  def batch_shards(self) -> int:
    """``D = data * fsdp``: the number of row shards of a batch."""
    return self.shape[0] * self.shape[1]

  def make_mesh(self, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The concrete mesh of this plan over the first ``size`` of ``devices`` (default: all)."""
    devices = list(jax.devices() if devices is None else devices)
    return make_mesh(*self.shape, devices=devices[:self.size])

  def describe(self) -> str:
    d, f, t = self.shape
    return f"data={d} x fsdp={f} x tensor={t} = {self.size} of {self.available} devices"


def _divisors_desc(n: int) -> list[int]:
  return [d for d in range(n, 0, -1) if n % d == 0]


def plan_mesh(cfg: Config, num_devices: int, *, process_count: int = 1,
              model_config: Any = None) -> MeshPlan:
  """Resolves ``cfg.mesh`` against ``num_devices`` and checks the batch fits it.

  Rules (each violation is a ``ConfigError`` naming the numbers):

  * one axis may be ``-1``: it takes the devices the others leave. When that
    axis is a batch axis (``data`` or ``fsdp``) and the run has one process,
    it shrinks to the largest size whose batch shards divide a micro-batch
    (a tiny config on a big machine uses fewer devices; ``MeshPlan.note`` says
    so). With several processes every device must be used.
  * an explicit mesh must use all devices, or, with one process, a divisor of
    them (the first ones; ``note`` says so).
  * the micro-batch rows must be a multiple of ``data * fsdp``;
  * ``tensor`` must divide the attention heads and KV heads (``model_config``).
  """
  m = cfg.mesh
  sizes = [m.data, m.fsdp, m.tensor]
  named = _named(sizes)
  n = int(num_devices)
  micro = cfg.micro_batch_rows
  note = None
  i = _fill_free_axis(sizes, n, "mesh")
  if i is not None:
    full = sizes[i]
    if i < 2 and process_count == 1:
      other = sizes[1 - i]
      fit = next(d for d in _divisors_desc(full) if micro % (d * other) == 0 or d == 1)
      if fit < full:
        sizes[i] = fit
        note = (f"mesh.{AXES[i]}=-1 resolved to {fit}, not {full}: a micro-batch of {micro} rows "
                f"does not split over {full * other} batch shards; using {math.prod(sizes)} of "
                f"{n} devices")
  uses_fewer = _check_device_count(sizes, n, process_count, "mesh", named)
  note = note or uses_fewer
  d, f, t = sizes
  plan = MeshPlan((d, f, t), n, note)
  b = plan.batch_shards
  if micro % b:
    rows = cfg.rows_per_step
    raise ConfigError(
        f"train.micro_batches: a micro-batch of {micro} rows (prompts_per_step "
        f"{cfg.rollout.prompts_per_step} x samples_per_prompt {cfg.rollout.samples_per_prompt} = "
        f"{rows}, / mini_batches {cfg.train.mini_batches} / micro_batches "
        f"{cfg.train.micro_batches}) does not split over data x fsdp = {d} x {f} = {b} devices; "
        f"make it a multiple of {b}")
  if cfg.rollout.prompts_per_step % process_count:
    raise ConfigError(f"rollout.prompts_per_step: {cfg.rollout.prompts_per_step} prompts do not "
                      f"split over {process_count} processes")
  _check_tensor_heads(model_config, t, f"mesh.tensor: {t}")
  return plan


def plan_shape(sizes: Sequence[int], num_devices: int, *, process_count: int = 1,
               model_config: Any = None, what: str = "mesh") -> MeshPlan:
  """Resolves an explicit ``(data, fsdp, tensor)`` against ``num_devices``, without a batch.

  The device rules of ``plan_mesh`` for a job that has no training batch to
  split (evaluation: the sampler pads its rows to the batch shards): one
  axis may be ``-1`` (the devices the others leave, never shrunk); the
  product must equal ``num_devices`` or, with one process, divide it (the
  first devices; ``note`` says so); ``tensor`` must divide the attention and
  KV heads of ``model_config``. Each violation is a ``ConfigError`` whose
  message starts with ``what`` and names the numbers.
  """
  sizes = list(sizes)
  if len(sizes) != len(AXES):
    raise ConfigError(f"{what}: expected {len(AXES)} axis sizes {AXES}, got {sizes}")
  for a, s in zip(AXES, sizes):
    if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or not (s == -1 or s >= 1):
      raise ConfigError(f"{what}: {a}={s!r}; an axis size must be an int >= 1 or -1")
  n = int(num_devices)
  _fill_free_axis(sizes, n, what)
  note = _check_device_count(sizes, n, process_count, what, _named(sizes))
  _check_tensor_heads(model_config, sizes[2], f"{what}: tensor={sizes[2]}")
  return MeshPlan((sizes[0], sizes[1], sizes[2]), n, note)


def _named(sizes: Sequence[int]) -> str:
  return " x ".join(f"{a}={s}" for a, s in zip(AXES, sizes))


def _fill_free_axis(sizes: list, n: int, what: str) -> int | None:
  """Gives the one ``-1`` axis of ``sizes`` (in place) the devices the others leave.

  Returns its index, or None when no axis is ``-1``.
  """
  if sizes.count(-1) > 1:
    raise ConfigError(f"{what}: at most one axis may be -1, got {_named(sizes)}")
  if -1 not in sizes:
    return None
  i = sizes.index(-1)
  known = math.prod(s for s in sizes if s != -1)
  if n % known:
    raise ConfigError(f"{what}: {_named(sizes)}: the fixed axes use {known} devices, which does "
                      f"not divide the {n} available devices")
  sizes[i] = n // known
  return i


def _check_device_count(sizes, n: int, process_count: int, what: str, named: str) -> str | None:
  """None when the mesh uses all ``n`` devices; a note when, with one process, it uses the first
  of them; else a ``ConfigError`` with the numbers."""
  size = math.prod(sizes)
  if size == n:
    return None
  if process_count > 1 or n % size:
    why = ("with several processes the mesh must use every device" if process_count > 1 and
           n % size == 0 else f"{size} does not divide {n}")
    raise ConfigError(f"{what}: {named} = {size} devices, but {n} are available ({why})")
  return f"{what} {named} uses the first {size} of {n} devices"


def _check_tensor_heads(model_config, t: int, prefix: str) -> None:
  """``tensor`` must divide the attention and key/value heads."""
  if model_config is None:
    return
  for name in ("num_heads", "num_kv_heads"):
    heads = getattr(model_config, name)
    if heads % t:
      raise ConfigError(f"{prefix} does not divide the model's {heads} "
                        f"{'attention' if name == 'num_heads' else 'key/value'} heads")
