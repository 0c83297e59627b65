"""Layer 1: masked reductions, log-probs/entropy from logits, fixed-shape top-k, quantiles."""
from jaxent.ops._checks import (as_valid, check_float, check_ndim, check_scalar, check_shapes,
                                concrete_scalar, upcast)
from jaxent.ops._logprobs import HiddenAndHead, entropy_from_logits, logprobs_and_entropy
from jaxent.ops._masked import (AGG_MODES, aggregate, centered_products, check_agg, count_valid,
                                masked_mean, masked_sum, safe_div)
from jaxent.ops._quantile import quantile_mask
from jaxent.ops._select import selection_count, static_count_bound, top_k_mask

__all__ = [
    "AGG_MODES",
    "HiddenAndHead",
    "aggregate",
    "as_valid",
    "centered_products",
    "check_agg",
    "check_float",
    "check_ndim",
    "check_scalar",
    "check_shapes",
    "concrete_scalar",
    "count_valid",
    "entropy_from_logits",
    "logprobs_and_entropy",
    "masked_mean",
    "masked_sum",
    "quantile_mask",
    "safe_div",
    "selection_count",
    "static_count_bound",
    "top_k_mask",
    "upcast",
]
