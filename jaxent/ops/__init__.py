"""Layer 1: masked reductions, log-probs/entropy from logits, fixed-shape top-k."""
from jaxent.ops._select import selection_count, static_count_bound, top_k_mask

__all__ = ["selection_count", "static_count_bound", "top_k_mask"]
