"""Layer 0: the pytrees that travel between the layers, and shape conventions.

Shape letters: B rows (responses), P padded prompt length, R response length
(``max_new_tokens``), S = P + R, V vocabulary.

A row is a left-padded prompt followed by the response::

  tokens    [pad pad p0 p1 p2 | r0 r1 r2 eos pad]
  positions [ 0   0  0  1  2  |  3  4  5  6   7 ]
  attention [ 0   0  1  1  1  |  1  1  1  1   0 ]

so the logits at ``P - 1 + t`` predict response token ``t`` for every row.

The device mesh has the axes ``MESH_AXES``; every ``Batch`` array is split
by rows over ``BATCH_AXES`` (``data * fsdp`` row shards).
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the mesh axes a batch's rows are split over


class Batch(NamedTuple):
  """One rollout's training data; every array has leading dimension B."""
  tokens: jax.Array          # int32 [B, S] prompt (left-padded) + response
  positions: jax.Array       # int32 [B, S] RoPE positions (0 at the first real prompt token)
  attention_mask: jax.Array  # int32 [B, S] 1 for a real token
  response_mask: jax.Array   # float32 [B, R] 1 for a real response token (up to and including EOS)
  advantages: jax.Array      # float32 [B, R] per-token advantages (GRPO: the row's advantage broadcast)
  old_log_prob: jax.Array    # float32 [B, R] log pi_old of the sampled tokens (behaviour policy)
  ref_log_prob: jax.Array    # float32 [B, R] log pi_ref (zeros when no reference KL is used)
  # float32 [B, R] the sampler's log-prob of each sampled token under the distribution it was
  # drawn from (0 where response_mask is 0); None where no sampler produced the batch
  rollout_log_prob: jax.Array | None = None

  @property
  def prompt_len(self) -> int:
    return self.tokens.shape[1] - self.response_mask.shape[1]


class TrainState(NamedTuple):
  """Everything the update step changes; donated to ``train_step``."""
  step: jax.Array            # int32 scalar: optimizer updates applied
  params: Any                # model parameters (pytree)
  opt_state: Any             # optax state
  key: jax.Array             # PRNG key for selection randomness
  loss_state: Any = ()       # the loss's own state (the adaptive entropy coefficient), else ()
