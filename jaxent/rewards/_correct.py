"""The one correctness rule: which rewards count as a correct response."""
from __future__ import annotations

import numpy as np

CORRECT_AT = 0.5  # a reward at or above this is a correct response (exact tasks score 0 or 1)


def is_correct(rewards) -> np.ndarray:
  """bool, the shape of ``rewards``: ``rewards >= CORRECT_AT`` (accuracy, pass@k, mean@k's counts)."""
  return np.asarray(rewards) >= CORRECT_AT
