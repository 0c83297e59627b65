"""Layer 4: on-device generation with a KV cache, and the log-probs RL needs.

``generate(model, prompts, ..., engine=)`` runs the static engine (a jitted
prefill and a jitted ``lax.while_loop`` decode over a preallocated KV cache,
``_sampler.py``) or the continuous-batching engine (slots refilled from a
queue on device as rows end, ``_continuous.py``); ``_sampling.py`` holds the
sampling semantics.
"""
from jaxent.sampler._continuous import ContinuousSampler, SlotState
from jaxent.sampler._sampler import (
    ENGINE_NAMES,
    TRACE_COUNTS,
    SampleOutput,
    SampleStats,
    Sampler,
    SamplingParams,
    SamplingState,
    default_slots,
    generate,
    prompt_bucket,
)
from jaxent.sampler._sampling import sample_logits, scale_logits, truncate_logits

__all__ = [
    "ENGINE_NAMES",
    "TRACE_COUNTS",
    "ContinuousSampler",
    "SampleOutput",
    "SampleStats",
    "SlotState",
    "Sampler",
    "SamplingParams",
    "SamplingState",
    "default_slots",
    "generate",
    "prompt_bucket",
    "sample_logits",
    "scale_logits",
    "truncate_logits",
]
