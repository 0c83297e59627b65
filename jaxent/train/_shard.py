"""The train state on a device mesh.

One SPMD program runs over the mesh ``("data", "fsdp", "tensor")`` (planned by
``sharding.plan_mesh``):

* parameters are sharded by their logical axes (``models.param_shardings``:
  FSDP on ``embed``, tensor parallelism on heads / mlp / vocab), the layout
  the loader and the sampler use too, so the sampler reads the trainer's
  arrays;
* the optimizer state mirrors the parameters leaf for leaf (Adam's ``mu`` and
  ``nu`` get their parameter's sharding, found with ``optax.tree_map_params``);
  its scalars (counts, the non-finite counter), the step and the PRNG key are
  replicated;
* every ``Batch`` array is split by rows over the batch axes
  (``sharding.batch_sharding``).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from jax.sharding import AbstractMesh, Mesh, NamedSharding

from jaxent import models, sharding
from jaxent.types import TrainState

AnyMesh = Mesh | AbstractMesh


# ----------------------------------------------------------------------------- shardings
def state_shardings(model_config, tx: optax.GradientTransformation, mesh: AnyMesh,
                    loss_state=()) -> TrainState:
  """Shardings of a ``TrainState``: params by logical axes, optimizer state like its params.

  ``loss_state`` (a structure like the train state's) is replicated.
  """
  psh = models.param_shardings(model_config, mesh)
  rep = sharding.replicated(mesh)
  opt_struct = jax.eval_shape(tx.init, models.param_shapes(model_config))
  osh = optax.tree_map_params(tx, lambda _, s: s, opt_struct, psh,
                              transform_non_params=lambda _: rep,
                              is_leaf=lambda x: isinstance(x, NamedSharding))
  return TrainState(step=rep, params=psh, opt_state=osh, key=rep,
                    loss_state=jax.tree.map(lambda _: rep, loss_state))


def constrain_like_params(model_config, tree):
  """``with_sharding_constraint`` of a params-shaped tree (e.g. gradients) to the params' layout.

  A no-op outside a mesh context (``jax.set_mesh`` / ``use_abstract_mesh``).
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty or mesh.size == 1:
    return tree
  return jax.tree.map(jax.lax.with_sharding_constraint, tree, models.param_specs(model_config, mesh))


# ----------------------------------------------------------------------------- placement
def _put(x, s: NamedSharding):
  # A fresh copy, so the caller's arrays stay valid; an array already on the
  # mesh (``models.from_pretrained(..., mesh=)``) is copied device to device.
  return sharding.put(x, s, may_alias=False)


def place(tree, shardings):
  """Fresh copies of ``tree`` laid out by ``shardings`` (the caller's arrays stay valid)."""
  return jax.tree.map(_put, tree, shardings)


def init_train_state(params, tx: optax.GradientTransformation, key, shardings: TrainState,
                     loss_state=()) -> TrainState:
  """``TrainState`` at step 0 with ``params`` copied onto the mesh and ``tx.init`` run there."""
  placed = place(params, shardings.params)
  key = _put(jnp.asarray(key) if not isinstance(key, jax.Array) else key, shardings.key)

  def init(p, k):
    return TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p), key=k,
                      loss_state=loss_state)

  return jax.jit(init, out_shardings=shardings)(placed, key)
