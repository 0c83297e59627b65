"""Mesh construction, the logical-axis table, and constrain()."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from jaxent import sharding
from jaxent.types import BATCH_AXES as OPS_BATCH_AXES


@pytest.mark.parametrize("args,shape", [
    ((8, 1, 1), (8, 1, 1)),
    ((2, 4, 1), (2, 4, 1)),
    ((2, 2, 2), (2, 2, 2)),
    ((-1, 2, 2), (2, 2, 2)),
    ((2, -1, 1), (2, 4, 1)),
    ((), (8, 1, 1)),            # default: all devices on "data"
])
def test_make_mesh_shapes(args, shape):
  mesh = sharding.make_mesh(*args)
  assert mesh.axis_names == ("data", "fsdp", "tensor")
  assert tuple(mesh.shape.values()) == shape
  assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in jax.devices())
  assert all(t == AxisType.Auto for t in mesh.axis_types)


def test_make_mesh_on_given_devices_and_explicit_types():
  devs = jax.devices()[:4]
  mesh = sharding.make_mesh(2, 2, 1, devices=devs, axis_types=AxisType.Explicit)
  assert {d.id for d in mesh.devices.flat} == {d.id for d in devs}
  assert all(t == AxisType.Explicit for t in mesh.axis_types)


@pytest.mark.parametrize("args,pattern", [
    ((3, 1, 1), r"data=3 x fsdp=1 x tensor=1 = 3 devices, but 8"),
    ((4, 4, 1), r"= 16 devices, but 8"),
    ((-1, 3, 1), r"fsdp=3 x tensor=1 = 3 does not divide the 8"),
    ((-1, -1, 1), r"at most one mesh axis may be -1"),
    ((0, 1, 1), r"'data' has size 0"),
    ((8, 1, -2), r"'tensor' has size -2"),
])
def test_make_mesh_errors_name_the_numbers(args, pattern):
  with pytest.raises(ValueError, match=pattern):
    sharding.make_mesh(*args)


def test_logical_table():
  # The batch axes are the ones ops' sharded top-k reduces over.
  assert sharding.BATCH_AXES == OPS_BATCH_AXES == ("data", "fsdp")
  assert sharding.logical_to_spec(("batch", "seq")) == P(("data", "fsdp"), None)
  assert sharding.logical_to_spec(("embed", "mlp")) == P("fsdp", "tensor")
  assert sharding.logical_to_spec(("vocab", None)) == P("tensor", None)
  # A mesh axis shards one dimension only: the second "batch" gets nothing.
  assert sharding.logical_to_spec(("batch", "embed")) == P(("data", "fsdp"), None)
  with pytest.raises(ValueError, match="unknown logical axis 'bogus'"):
    sharding.logical_to_spec(("batch", "bogus"))


def test_constrain_is_identity_without_mesh():
  x = jnp.arange(12.0).reshape(4, 3)
  assert sharding.constrain(x, ("batch", "embed")) is x
  with pytest.raises(ValueError, match="2 logical axes .* rank 1"):
    sharding.constrain(jnp.ones(3), ("batch", "embed"))


def test_constrain_shards_by_the_table():
  mesh = sharding.make_mesh(2, 2, 2)
  x = np.arange(8 * 4, dtype=np.float32).reshape(8, 4)
  with jax.set_mesh(mesh):
    y = jax.jit(lambda a: sharding.constrain(a * 2, ("batch", "vocab")))(x)
  assert y.sharding.spec == P(("data", "fsdp"), "tensor")
  np.testing.assert_array_equal(np.asarray(y), 2 * x)
  # Mesh axes absent from the current mesh are dropped, not an error.
  other = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
  with jax.set_mesh(other):
    z = jax.jit(lambda a: sharding.constrain(a + 1, ("batch", "vocab")))(x)
  assert z.sharding.is_equivalent_to(NamedSharding(other, P("data", None)), 2)


def test_named_sharding():
  mesh = sharding.make_mesh(2, 2, 2)
  s = sharding.named_sharding(mesh, ("batch", "seq"))
  assert s.spec == P(("data", "fsdp"), None) and s.mesh is mesh


def test_collective_sizes_parses_hlo_lines():
  text = """
  %all-gather.1 = f32[256]{0} all-gather(f32[32]{0} %p), channel_id=1, dimensions={0}
  %ag-start = (s32[32]{0}, s32[4096,2]{1,0}) all-gather-start(s32[32]{0} %q), dimensions={0}
  %a2a = (bf16[8,16]{1,0}, bf16[8,16]{1,0}) all-to-all(bf16[8,16]{1,0} %x, bf16[8,16]{1,0} %y)
  %cp = pred[3,5]{1,0} collective-permute(pred[3,5]{1,0} %m), source_target_pairs={{0,1}}
  %ar = f32[1000]{0} all-reduce(f32[1000]{0} %s), to_apply=%add
  %add.2 = f32[7]{0} add(f32[7]{0} %u, f32[7]{0} %v)
  """
  assert sharding.collective_sizes(text) == [
      ("all-gather", 256), ("all-gather", 8192), ("all-to-all", 128), ("collective-permute", 15)]
  assert sharding.collective_sizes(text, ops=("all-reduce",)) == [("all-reduce", 1000)]
