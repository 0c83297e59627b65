"""The train state and the batches on a device mesh, and the checks made before a run.

One SPMD program runs over the mesh ``("data", "fsdp", "tensor")``:

* parameters are sharded by their logical axes (``models.param_logical_axes``
  through ``sharding.LOGICAL_RULES``: FSDP on ``embed``, tensor parallelism on
  heads / mlp / vocab); a mesh axis that does not divide a dimension is dropped
  from that dimension (it is replicated), as the sampler does, so trainer and
  sampler hold the same layout and the sampler reads the trainer's arrays;
* the optimizer state mirrors the parameters leaf for leaf (Adam's ``mu`` and
  ``nu`` get their parameter's sharding, found with ``optax.tree_map_params``);
  its scalars (counts, the non-finite counter), the step and the PRNG key are
  replicated;
* every ``Batch`` array is split by rows over the batch axes ``("data",
  "fsdp")`` (``D = data * fsdp`` shards), so a micro-batch's row count must be
  a multiple of ``D``.

Across processes (``jax.distributed``) each process holds the shards of its own
devices; the host-side helpers here gather what the host needs (prompts,
sampled tokens, rewards) in process order.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec as P

from jaxent import models, sharding
from jaxent.config import Config, ConfigError
# One definition of the "drop a mesh axis that does not divide" rule, shared
# with the loader (re-exported here for the trainer's callers).
from jaxent.models._hf import fit_spec  # noqa: F401
from jaxent.sharding import AXES, BATCH_AXES
from jaxent.types import TrainState

AnyMesh = Mesh | AbstractMesh


# ----------------------------------------------------------------------------- the plan
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

  def describe(self) -> str:
    d, f, t = self.shape
    return f"data={d} x fsdp={f} x tensor={t} = {self.size} of {self.available} devices"


def micro_batch_rows(cfg: Config) -> int:
  """Rows of one micro-batch: ``prompts_per_step * samples_per_prompt / mini / micro``."""
  rows = cfg.rollout.prompts_per_step * cfg.rollout.samples_per_prompt
  return rows // cfg.train.mini_batches // cfg.train.micro_batches


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
  micro = micro_batch_rows(cfg)
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
    rows = cfg.rollout.prompts_per_step * cfg.rollout.samples_per_prompt
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


def make_train_mesh(plan: MeshPlan, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """The concrete mesh of ``plan`` over the first ``plan.size`` of ``devices``."""
  devices = list(jax.devices() if devices is None else devices)
  return sharding.make_mesh(*plan.shape, devices=devices[:plan.size])


# ----------------------------------------------------------------------------- shardings
def param_specs(model_config, mesh: AnyMesh):
  """``PartitionSpec`` of every parameter (a pytree like the params).

  The models layer owns this layout (``models.param_specs``) so that
  ``models.from_pretrained(path, mesh=mesh)`` loads straight into it.
  """
  return models.param_specs(model_config, mesh)


def param_shardings(model_config, mesh: AnyMesh):
  """``NamedSharding`` of every parameter on ``mesh``."""
  return models.param_shardings(model_config, mesh)


def replicated(mesh: AnyMesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: AnyMesh) -> NamedSharding:
  """Rows over ``("data", "fsdp")``; a prefix for every ``Batch`` array."""
  return NamedSharding(mesh, P(tuple(a for a in BATCH_AXES if a in mesh.axis_names)))


def state_shardings(model_config, tx: optax.GradientTransformation, mesh: AnyMesh) -> TrainState:
  """Shardings of a ``TrainState``: params by logical axes, optimizer state like its params."""
  psh = param_shardings(model_config, mesh)
  rep = replicated(mesh)
  opt_struct = jax.eval_shape(tx.init, models.param_shapes(model_config))
  osh = optax.tree_map_params(tx, lambda _, s: s, opt_struct, psh,
                              transform_non_params=lambda _: rep,
                              is_leaf=lambda x: isinstance(x, NamedSharding))
  return TrainState(step=rep, params=psh, opt_state=osh, key=rep)


def constrain_like_params(model_config, tree):
  """``with_sharding_constraint`` of a params-shaped tree (e.g. gradients) to the params' layout.

  A no-op outside a mesh context (``jax.set_mesh`` / ``use_abstract_mesh``).
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty or mesh.size == 1:
    return tree
  return jax.tree.map(jax.lax.with_sharding_constraint, tree, param_specs(model_config, mesh))


# ----------------------------------------------------------------------------- placement
def _put(x, s: NamedSharding):
  # An array already on the mesh (``models.from_pretrained(..., mesh=)``) is
  # copied device to device, shard by shard: nothing passes through the host
  # or one device.
  if isinstance(x, jax.Array) and not s.is_fully_addressable and x.is_fully_addressable:
    # Another process's devices cannot receive this process's buffer: every
    # process passes the same host value and places its own shards.
    x = np.asarray(x)
  return jax.device_put(x, s, may_alias=False)


def place(tree, shardings):
  """Fresh copies of ``tree`` laid out by ``shardings`` (the caller's arrays stay valid)."""
  return jax.tree.map(_put, tree, shardings)


def init_train_state(params, tx: optax.GradientTransformation, key, shardings: TrainState) -> TrainState:
  """``TrainState`` at step 0 with ``params`` copied onto the mesh and ``tx.init`` run there."""
  placed = place(params, shardings.params)
  key = _put(jnp.asarray(key) if not isinstance(key, jax.Array) else key, shardings.key)

  def init(p, k):
    return TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p), key=k)

  return jax.jit(init, out_shardings=shardings)(placed, key)


# ----------------------------------------------------------------------------- hosts
def host_array(x) -> np.ndarray:
  """A device array on this host in full (gathered from the other processes if needed)."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def _allgather(x: np.ndarray) -> np.ndarray:
  """``[process_count, *x.shape]``: every process's ``x``, in process order."""
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(np.asarray(x), tiled=False))


def gather_prompts(prompts: list[list[int]]) -> list[list[int]]:
  """This process's prompts -> the global prompt list (processes in order)."""
  if jax.process_count() == 1:
    return prompts
  lens = _allgather(np.asarray([len(p) for p in prompts], np.int32))
  width = int(lens.max())
  mine = np.zeros((len(prompts), width), np.int32)
  for i, p in enumerate(prompts):
    mine[i, :len(p)] = p
  toks = _allgather(mine)
  return [toks[r, i, :lens[r, i]].tolist() for r in range(toks.shape[0]) for i in range(toks.shape[1])]


def gather_rows(x: np.ndarray) -> np.ndarray:
  """Per-process row blocks -> the global rows (processes in order)."""
  if jax.process_count() == 1:
    return np.asarray(x)
  g = _allgather(x)
  return g.reshape((-1,) + g.shape[2:])


def sum_counters(counters: Mapping[str, Any]) -> dict:
  """Numeric counters summed over processes (each counted its own rows)."""
  if jax.process_count() == 1:
    return dict(counters)
  keys = sorted(k for k, v in counters.items() if isinstance(v, (int, float, np.number)))
  tot = _allgather(np.asarray([float(counters[k]) for k in keys], np.float64)).sum(axis=0)
  return {k: (int(v) if isinstance(counters[k], (int, np.integer)) else float(v))
          for k, v in zip(keys, tot)}
