"""Host layer: prompt datasets (grain), tokenization, generated tasks.

Never jitted. ``load_prompts`` reads and validates JSONL/Parquet rows and
tokenizes them; ``PromptIterator`` yields shuffled, repeated, process-sharded
``PromptBatch``es with checkpointable state; ``jaxent.data.arithmetic`` holds
the generated task of the demo.
"""
from jaxent.data import arithmetic
from jaxent.data._pipeline import (
    PromptBatch,
    PromptDataConfig,
    PromptIterator,
    make_prompt_iterator,
)
from jaxent.data._source import (
    MAX_CHARS_PER_TOKEN,
    OVERLONG_MODES,
    DataError,
    DataStats,
    Example,
    PromptSet,
    load_prompts,
    max_line_bytes,
    max_prompt_chars,
    tokenize_prompt,
)
from jaxent.data._template import TEMPLATE_TIMEOUT_S

__all__ = [
    "MAX_CHARS_PER_TOKEN",
    "OVERLONG_MODES",
    "TEMPLATE_TIMEOUT_S",
    "DataError",
    "DataStats",
    "Example",
    "PromptBatch",
    "PromptDataConfig",
    "PromptIterator",
    "PromptSet",
    "arithmetic",
    "load_prompts",
    "make_prompt_iterator",
    "max_line_bytes",
    "max_prompt_chars",
    "tokenize_prompt",
]
