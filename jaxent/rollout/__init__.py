"""Layer 5: prompts -> engine -> responses -> rewards -> advantages -> a fixed-shape Batch.

``collect`` runs one RL step's rollout (DAPO refill and the multi-host gather
included) and returns a :class:`Rollout`; an :class:`Engine` generates, and
``generate_calls`` is the one chunked-generation driver (training rollouts,
held-out evaluation and ``jaxent eval`` all go through it).
"""
from jaxent.rollout._collect import (Grader, PromptSource, Rollout, Task, collect, decoding_of,
                                     generate)
from jaxent.rollout._engine import (ENGINES, Call, Chunk, Decoding, Engine, Generated,
                                    SamplerEngine, engine_of, generate_calls, make_engine,
                                    sync_engine)
from jaxent.rollout._rollout import (RolloutStats, Selected, assemble, select_groups, selected_rows,
                                     to_device, uniform_groups)
from jaxent.sampler import prompt_bucket as bucket_length  # the one bucket rule, under its rollout name

__all__ = [
    "Call", "Chunk", "Decoding", "ENGINES", "Engine", "Generated", "Grader", "PromptSource",
    "Rollout", "RolloutStats", "SamplerEngine", "Selected", "Task", "assemble", "bucket_length",
    "collect", "decoding_of", "engine_of", "generate", "generate_calls", "make_engine", "select_groups",
    "selected_rows", "sync_engine", "to_device", "uniform_groups",
]
