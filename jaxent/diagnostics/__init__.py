"""Layer 2: entropy-mechanism diagnostics (Cui et al. 2025).

Jit-able: :func:`entropy_change_first_order` (the first-order entropy change
of a softmax policy) and :func:`token_covariance` (per-token covariance of
log-probability and advantage, with the statistics a trainer logs).
Host-side NumPy: :func:`fit_entropy_law` (``R = −a·exp(H) + b``).

Reading run directories and plotting for ``jaxent fit-law`` live in
``jaxent.apps`` (the functional core does no file I/O).
"""
from jaxent.diagnostics._covariance import token_covariance
from jaxent.diagnostics._entropy import entropy_change_first_order
from jaxent.diagnostics._law import LawFit, fit_entropy_law

__all__ = [
    "LawFit",
    "entropy_change_first_order",
    "fit_entropy_law",
    "token_covariance",
]
