"""The parameter layout on a device mesh: the trainer's, the sampler's and the loader's.

Each parameter's logical axes (``param_logical_axes``) go through the one
table ``jaxent.sharding.LOGICAL_RULES``; a mesh axis that does not divide a
dimension is dropped from it (``sharding.fit_spec``: that dimension is
replicated), so every component that places parameters holds the same layout.
"""
from __future__ import annotations

from typing import Any

import jax
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxent import sharding as sharding_lib
from jaxent.models._config import ModelConfig
from jaxent.models._model import param_logical_axes, param_shapes


def _is_axes(a) -> bool:
  return isinstance(a, tuple) and all(isinstance(s, str) for s in a)


def param_specs(cfg: ModelConfig, mesh) -> Any:
  """``PartitionSpec`` of every parameter on ``mesh`` (a pytree like the params).

  ``param_logical_axes`` through ``jaxent.sharding.LOGICAL_RULES``, with mesh
  axes that do not divide a dimension dropped (that dimension is replicated).
  ``mesh`` may be a ``Mesh`` or an ``AbstractMesh``.
  """
  sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
  return jax.tree.map(lambda ax, s: sharding_lib.fit_spec(s.shape, sharding_lib.logical_to_spec(ax), sizes),
                      param_logical_axes(cfg), param_shapes(cfg), is_leaf=_is_axes)


def param_shardings(cfg: ModelConfig, mesh) -> Any:
  """``NamedSharding`` of every parameter on ``mesh`` (the trainer's and sampler's layout)."""
  return jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs(cfg, mesh),
                      is_leaf=lambda x: isinstance(x, P))
