"""Layer 2: the device mesh, its planning, and the logical-axis table."""
from jaxent.sharding._hlo import GATHERING_COLLECTIVES, collective_sizes
from jaxent.sharding._hosts import gather_prompts, gather_rows, host_array, put, sum_counters
from jaxent.sharding._mesh import (
    AXES,
    BATCH_AXES,
    LOGICAL_RULES,
    batch_sharding,
    constrain,
    fit_spec,
    logical_to_spec,
    make_mesh,
    mesh_of,
    named_sharding,
    replicated,
)
from jaxent.sharding._plan import MeshPlan, parse_mesh, plan_mesh, plan_shape

__all__ = [
    "AXES",
    "BATCH_AXES",
    "GATHERING_COLLECTIVES",
    "LOGICAL_RULES",
    "MeshPlan",
    "batch_sharding",
    "collective_sizes",
    "constrain",
    "fit_spec",
    "gather_prompts",
    "gather_rows",
    "host_array",
    "logical_to_spec",
    "make_mesh",
    "mesh_of",
    "named_sharding",
    "parse_mesh",
    "plan_mesh",
    "plan_shape",
    "put",
    "replicated",
    "sum_counters",
]
