"""Layer 6: the jitted update step, optimizer, loop, checkpoints, logging and run loading."""
from jaxent.train._build import arithmetic_files, build_components, load_policy, model_config, train_mesh
from jaxent.train._checkpoint import Checkpointer, run_path
from jaxent.train._logging import MetricsLogger
from jaxent.train._loop import Components, Hook, StepEnd, TrainResult, train
from jaxent.train._rundir import Claim
from jaxent.train._rundir import claim as claim_run_dir
from jaxent.train._restore import eval_mesh, load_model_or_run, load_run, model_config_of
from jaxent.train._sft import make_sft_step, sft_loss
from jaxent.train._shard import init_train_state, place, state_shardings
from jaxent.train._step import (
    StepSpec,
    check_correction,
    init_loss_state,
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
    "Checkpointer", "Claim", "Components", "Hook", "MetricsLogger", "StepEnd", "StepSpec", "TrainResult",
    "arithmetic_files", "build_components", "check_correction", "claim_run_dir", "eval_mesh",
    "init_loss_state", "init_state", "init_train_state",
    "jit_logprobs", "jit_train_step", "load_model_or_run", "load_policy", "load_run",
    "make_optimizer", "make_sft_step", "model_config", "model_config_of", "nonfinite_count",
    "place", "response_logprobs", "run_path", "sft_loss", "state_shardings", "step_shardings",
    "train", "train_mesh", "train_step_impl",
]
