"""Layer 3: Qwen2 / Llama / Qwen3 decoder (flax) and HF checkpoint import/export.

Pure functions over a params pytree for jit (``apply``, ``init_cache``) and a
thin ``Model`` (config + params) for eager use. See docs/MODELS.md.
"""
from jaxent.models._attention import attention, cache_spans, cached_attention
from jaxent.models._config import SUPPORTED_MODEL_TYPES, SUPPORTED_ROPE_TYPES, ModelConfig
from jaxent.models._hf import (
    from_pretrained,
    hf_state_dict,
    load_config,
    load_tokenizer,
    save_pretrained,
)
from jaxent.models._layout import param_shardings, param_specs
from jaxent.models._layers import apply_rope, rope_inv_freq
from jaxent.models._model import (
    KVCache,
    Model,
    apply,
    cache_logical_axes,
    default_positions,
    init_cache,
    init_model,
    init_params,
    param_logical_axes,
    param_shapes,
)

__all__ = [
    "KVCache",
    "Model",
    "ModelConfig",
    "SUPPORTED_MODEL_TYPES",
    "SUPPORTED_ROPE_TYPES",
    "apply",
    "apply_rope",
    "attention",
    "cache_spans",
    "cached_attention",
    "cache_logical_axes",
    "default_positions",
    "from_pretrained",
    "hf_state_dict",
    "init_cache",
    "init_model",
    "init_params",
    "load_config",
    "load_tokenizer",
    "param_logical_axes",
    "param_shapes",
    "param_shardings",
    "param_specs",
    "rope_inv_freq",
    "save_pretrained",
]
