"""Layer 2: the device mesh and the logical-axis table."""
from jaxent.sharding._hlo import GATHERING_COLLECTIVES, collective_sizes
from jaxent.sharding._mesh import (
    AXES,
    BATCH_AXES,
    LOGICAL_RULES,
    constrain,
    logical_to_spec,
    make_mesh,
    named_sharding,
)

__all__ = [
    "AXES",
    "BATCH_AXES",
    "GATHERING_COLLECTIVES",
    "LOGICAL_RULES",
    "collective_sizes",
    "constrain",
    "logical_to_spec",
    "make_mesh",
    "named_sharding",
]
