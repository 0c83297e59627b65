"""Layer 2: GRPO-family outcome advantages."""
from jaxent.advantages._outcome import broadcast_to_tokens, grpo, rloo, sequence_scores

__all__ = ["broadcast_to_tokens", "grpo", "rloo", "sequence_scores"]
