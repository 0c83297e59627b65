"""Mesh construction and the one table mapping logical axes to mesh axes.

Model code names logical axes (``batch``, ``seq``, ``embed``, ``heads``,
``kv_heads``, ``mlp``, ``vocab``); ``LOGICAL_RULES`` maps each to mesh axes of
the mesh ``("data", "fsdp", "tensor")``.
"""
from __future__ import annotations

from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

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
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh with axes ``("data", "fsdp", "tensor")``.

  One of the sizes may be ``-1`` and is then inferred from the device count.
  Raises ``ValueError`` naming the sizes when they do not divide the devices.
  """
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  sizes = [data, fsdp, tensor]
  for name, s in zip(AXES, sizes):
    if s == 0 or s < -1:
      raise ValueError(f"mesh axis {name!r} has size {s}; sizes must be positive or -1")
  if sizes.count(-1) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got data={data}, fsdp={fsdp}, tensor={tensor}")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if n % known:
      raise ValueError(f"mesh fsdp*tensor*data={known} (without the -1 axis) does not divide "
                       f"the {n} available devices")
    sizes[sizes.index(-1)] = n // known
  if int(np.prod(sizes)) != n:
    raise ValueError(f"mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} = "
                     f"{int(np.prod(sizes))} devices, but {n} are available")
  try:
    arr = jax.experimental.mesh_utils.create_device_mesh(sizes, devices=devices)
  except Exception:  # noqa: BLE001 - CPU/host devices have no topology to honour
    arr = np.asarray(devices, dtype=object).reshape(sizes)
  return Mesh(arr, AXES)


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
  return NamedSharding(mesh, logical_to_spec(logical_axes, rules))


def constrain(x: jax.Array, logical_axes: Sequence[str | None],
              rules: dict | None = None) -> jax.Array:
  """``with_sharding_constraint`` by logical axes; a no-op without a mesh.

  Uses the mesh set by ``jax.set_mesh`` (or ``with mesh:``). Outside any mesh,
  or on a single device, it returns ``x`` unchanged, so model code can call it
  unconditionally.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty or mesh.size == 1:
    return x
  if len(logical_axes) != x.ndim:
    raise ValueError(f"constrain: {len(logical_axes)} logical axes {tuple(logical_axes)} "
                     f"for an array of rank {x.ndim}")
  spec = logical_to_spec(logical_axes, rules)
  return jax.lax.with_sharding_constraint(x, spec)
