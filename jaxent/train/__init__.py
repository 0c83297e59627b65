"""Layer 6: the jitted update step, optimizer, loop, checkpoints and logging."""
from jaxent.train._checkpoint import Checkpointer
from jaxent.train._distributed import DistributedError, DistributedInfo, initialize_distributed
from jaxent.train._dryrun import DryRunReport, dry_run
from jaxent.train._logging import MetricsLogger
from jaxent.train._loop import (Components, Policy, TrainingError, TrainResult, evaluate,
                                generate_responses, train)
from jaxent.train._sft import make_sft_step, sft_loss
from jaxent.train._shard import state_shardings
from jaxent.train._step import (
    StepSpec,
    init_state,
    jit_logprobs,
    jit_train_step,
    make_optimizer,
    nonfinite_count,
    response_logprobs,
    step_shardings,
    train_step_impl,
)

__all__ = [
    "Checkpointer", "Components", "DistributedError", "DistributedInfo", "DryRunReport",
    "MetricsLogger", "Policy", "StepSpec", "TrainResult", "TrainingError", "dry_run", "evaluate",
    "generate_responses",
    "init_state", "initialize_distributed", "jit_logprobs", "jit_train_step", "make_optimizer",
    "make_sft_step", "nonfinite_count", "response_logprobs", "sft_loss",
    "state_shardings", "step_shardings", "train", "train_step_impl",
]
