"""Layer 6: the jitted update step, optimizer, loop, checkpoints and logging."""
from jaxent.train._checkpoint import Checkpointer
from jaxent.train._logging import MetricsLogger
from jaxent.train._loop import Components, Policy, TrainingError, TrainResult, evaluate, train
from jaxent.train._sft import make_sft_step, sft_loss
from jaxent.train._step import (
    StepSpec,
    init_state,
    jit_logprobs,
    jit_train_step,
    make_optimizer,
    nonfinite_count,
    response_logprobs,
    train_step_impl,
)

__all__ = [
    "Checkpointer", "Components", "MetricsLogger", "Policy", "StepSpec", "TrainResult",
    "TrainingError", "evaluate", "init_state", "jit_logprobs", "jit_train_step", "make_optimizer",
    "make_sft_step", "nonfinite_count", "response_logprobs", "sft_loss", "train", "train_step_impl",
]
