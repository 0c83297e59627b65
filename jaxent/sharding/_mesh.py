"""Mesh construction and the one table mapping logical axes to mesh axes.

Model code names logical axes (``batch``, ``seq``, ``embed``, ``heads``,
``kv_heads``, ``mlp``, ``vocab``); ``LOGICAL_RULES`` maps each to mesh axes of
the mesh ``("data", "fsdp", "tensor")``.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from jaxent.types import BATCH_AXES, MESH_AXES as AXES

# logical axis -> mesh axes (None: replicated). Activations are batch-sharded
# over data+fsdp; parameters are FSDP-sharded on their embed dimension and
# tensor-parallel on heads / mlp / vocab.
LOGICAL_RULES: dict[str, tuple[str, ...] | str | None] = {
    "batch": BATCH_AXES,
    "seq": None,
    "embed": "fsdp",
    "act_embed": None,
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "vocab": "tensor",
    "layers": None,
    "cache_seq": None,
}


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1,
              devices: Sequence[jax.Device] | None = None, *,
              axis_types: AxisType | Sequence[AxisType] = AxisType.Auto) -> Mesh:
  """A mesh with axes ``("data", "fsdp", "tensor")`` over all given devices.

  One of the sizes may be ``-1`` and is then inferred from the device count.
  The device order comes from ``jax.make_mesh``, which follows the physical
  topology on TPU/GPU (rings for the collectives) and is the plain order on
  CPU. Axes default to ``AxisType.Auto`` (GSPMD propagates shardings from
  in/out shardings and ``constrain``), unlike ``jax.make_mesh``'s Explicit
  default.

  Args:
    data, fsdp, tensor: axis sizes; their product must equal the number of
      devices.
    devices: the devices to use (default ``jax.devices()``, all hosts).
    axis_types: one ``AxisType`` for all axes, or one per axis.

  Raises:
    ValueError: naming the sizes and the device count when they do not fit.
  """
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  sizes = [data, fsdp, tensor]
  for name, s in zip(AXES, sizes):
    if not isinstance(s, int) or s == 0 or s < -1:
      raise ValueError(f"mesh axis {name!r} has size {s!r}; sizes must be positive ints or -1")
  if sizes.count(-1) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got data={data}, fsdp={fsdp}, tensor={tensor}")
  if -1 in sizes:
    known = math.prod(s for s in sizes if s != -1)
    if n % known:
      named = " x ".join(f"{a}={s}" for a, s in zip(AXES, sizes) if s != -1)
      raise ValueError(f"mesh {named} = {known} does not divide the {n} available devices, "
                       f"so the -1 axis {AXES[sizes.index(-1)]!r} cannot be inferred")
    sizes[sizes.index(-1)] = n // known
  if math.prod(sizes) != n:
    raise ValueError(f"mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} = "
                     f"{math.prod(sizes)} devices, but {n} are available")
  if isinstance(axis_types, AxisType):
    axis_types = (axis_types,) * len(AXES)
  axis_types = tuple(axis_types)
  if len(axis_types) != len(AXES):
    raise ValueError(f"axis_types has {len(axis_types)} entries {axis_types}; need {len(AXES)}")
  return jax.make_mesh(tuple(sizes), AXES, axis_types=axis_types, devices=devices)


def replicated(mesh) -> NamedSharding:
  """Every device holds the whole array."""
  return NamedSharding(mesh, P())


def batch_sharding(mesh) -> NamedSharding:
  """Rows over the batch axes ``("data", "fsdp")``; a prefix for every ``Batch`` array."""
  return NamedSharding(mesh, P(tuple(a for a in BATCH_AXES if a in mesh.axis_names)))


def mesh_of(tree) -> Mesh | None:
  """The one mesh every array of ``tree`` is laid out on (``NamedSharding``), else None."""
  meshes = set()
  for x in jax.tree.leaves(tree):
    sh = getattr(x, "sharding", None)
    if not isinstance(sh, NamedSharding) or not isinstance(sh.mesh, Mesh):
      return None
    meshes.add(sh.mesh)
  return meshes.pop() if len(meshes) == 1 else None


def logical_to_spec(logical_axes: Sequence[str | None],
                    rules: dict | None = None) -> P:
  """PartitionSpec for a tuple of logical axis names."""
  rules = LOGICAL_RULES if rules is None else rules
  out = []
  used: set[str] = set()
  for name in logical_axes:
    if name is None:
      out.append(None)
      continue
    if name not in rules:
      raise ValueError(f"unknown logical axis {name!r}; known: {sorted(rules)}")
    m = rules[name]
    ms = (m,) if isinstance(m, str) else tuple(m or ())
    ms = tuple(a for a in ms if a not in used)  # a mesh axis shards one dim only
    used.update(ms)
    out.append(None if not ms else (ms[0] if len(ms) == 1 else ms))
  return P(*out)


def named_sharding(mesh: Mesh, logical_axes: Sequence[str | None],
                   rules: dict | None = None) -> NamedSharding:
  """``NamedSharding`` on ``mesh`` for a tuple of logical axis names."""
  return NamedSharding(mesh, _restrict(logical_to_spec(logical_axes, rules), mesh))


def constrain(x: jax.Array, logical_axes: Sequence[str | None],
              rules: dict | None = None) -> jax.Array:
  """Sharding constraint by logical axes; a no-op without a mesh.

  Uses the mesh set by ``jax.set_mesh``. Outside any mesh, or on a single
  device, it returns ``x`` unchanged, so model code can call it
  unconditionally. Mesh axes the current mesh lacks, or holds as manual
  (inside ``shard_map``), are dropped from the spec. On Auto axes it is
  ``with_sharding_constraint``; on Explicit axes ``reshard``.
  """
  if len(logical_axes) != x.ndim:
    raise ValueError(f"constrain: {len(logical_axes)} logical axes {tuple(logical_axes)} "
                     f"for an array of rank {x.ndim}")
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty or mesh.size == 1:
    return x
  spec = _restrict(logical_to_spec(logical_axes, rules), mesh)
  if any(t == AxisType.Explicit for t in mesh.axis_types):
    return jax.sharding.reshard(x, spec)
  return jax.lax.with_sharding_constraint(x, spec)


def _restrict(spec: P, mesh) -> P:
  """Drop mesh axes that ``mesh`` does not have, or has as manual axes."""
  manual = set(getattr(mesh, "manual_axes", ()) or ())
  names = {a for a in mesh.axis_names if a not in manual}
  out = []
  for p in spec:
    ms = () if p is None else ((p,) if isinstance(p, str) else tuple(p))
    ms = tuple(a for a in ms if a in names)
    out.append(None if not ms else (ms[0] if len(ms) == 1 else ms))
  return P(*out)


def fit_spec(shape: Sequence[int], spec: P, sizes: Mapping[str, int]) -> P:
  """Drops mesh axes (absent or) not dividing their dimension: that dimension is replicated."""
  out = []
  for dim, ax in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = () if ax is None else ((ax,) if isinstance(ax, str) else tuple(ax))
    names = tuple(a for a in names if a in sizes)
    k = math.prod(sizes[a] for a in names)
    out.append(None if not names or dim % k else (names[0] if len(names) == 1 else names))
  return P(*out)
