"""Host layer: reward functions named in config, and bounded batch grading.

Never jitted. ``grade_batch(name, responses, answers, timeout_s=...)`` returns
float32 rewards and failure/timeout counters; a reward that raises, crashes
or times out scores 0 and is counted, never crashing the run.
"""
from jaxent.rewards._correct import CORRECT_AT, is_correct
from jaxent.rewards._exact import arithmetic_exact, arithmetic_partial, exact_match
from jaxent.rewards._math import math_reward
from jaxent.rewards._pool import GradeResult, GraderPool, default_pool, grade_batch
from jaxent.rewards._registry import (
    RewardSpec,
    get_reward,
    register_reward,
    reward_names,
    reward_spec,
)

register_reward("math", math_reward, isolated=True)
register_reward("arithmetic_exact", arithmetic_exact, isolated=False)
register_reward("arithmetic_partial", arithmetic_partial, isolated=False)
register_reward("exact_match", exact_match, isolated=False)

__all__ = [
    "CORRECT_AT",
    "GradeResult",
    "GraderPool",
    "RewardSpec",
    "arithmetic_exact",
    "arithmetic_partial",
    "default_pool",
    "exact_match",
    "get_reward",
    "grade_batch",
    "is_correct",
    "math_reward",
    "register_reward",
    "reward_names",
    "reward_spec",
]
