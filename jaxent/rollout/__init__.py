"""Layer 5: prompts -> sampler -> rewards -> advantages -> a fixed-shape Batch."""
from jaxent.rollout._rollout import (RolloutStats, assemble, bucket_length, select_groups, to_device,
                                     uniform_groups)

__all__ = ["RolloutStats", "assemble", "bucket_length", "select_groups", "to_device", "uniform_groups"]
