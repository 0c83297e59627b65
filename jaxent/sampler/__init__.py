"""Layer 4: on-device generation with a KV cache, and the log-probs RL needs.

``generate(model, prompts, ...)`` runs a jitted prefill and a jitted
``lax.while_loop`` decode over a preallocated KV cache; see ``_sampler.py``
for the cache layout and ``_sampling.py`` for the sampling semantics.
"""
from jaxent.sampler._sampler import (
    TRACE_COUNTS,
    SampleOutput,
    Sampler,
    SamplingParams,
    SamplingState,
    generate,
    prompt_bucket,
)
from jaxent.sampler._sampling import sample_logits, scale_logits, truncate_logits

__all__ = [
    "TRACE_COUNTS",
    "SampleOutput",
    "Sampler",
    "SamplingParams",
    "SamplingState",
    "generate",
    "prompt_bucket",
    "sample_logits",
    "scale_logits",
    "truncate_logits",
]
