"""Layer 0: the run configuration as frozen, validated dataclasses.

A run is described by one YAML file loaded into :class:`Config`. Every field
has a default and a one-line comment; ``--set a.b=c`` overrides are applied
before validation. An unknown key fails with the closest valid names, a wrong
type or an out-of-range value fails naming the key and what is allowed
(``ConfigError``; the CLI turns it into exit code 2 before anything is
written).
"""
from __future__ import annotations

import collections.abc
import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Sequence

import numpy as np
import yaml

from jaxent.errors import ConfigError, InputFileError
from jaxent.files import open_regular


LOGGERS = ("jsonl", "tensorboard", "wandb")
AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
LOSSES = ("ppo_clip", "clip_cov", "kl_cov", "gspo", "cispo", "gmpo")


def decoding_problem(*, temperature, top_p, top_k) -> tuple[str, str] | None:
  """The one rule for decoding knobs, shared by the config, evaluation and the sampler.

  ``temperature`` a finite number >= 0 (0: greedy); ``top_p`` in (0, 1] (1
  disables nucleus truncation; 0 would keep no token); ``top_k`` an int >= 0
  (0 disables). Returns ``(argument, rule)`` for the first knob that breaks
  it, or None; each caller words the error for its own input.
  """
  real = lambda x: not isinstance(x, bool) and isinstance(x, (int, float, np.integer, np.floating))  # noqa: E731
  if not real(temperature) or not math.isfinite(temperature) or temperature < 0:
    return "temperature", "must be a finite number >= 0 (0: greedy)"
  if not real(top_p) or not 0 < top_p <= 1:
    return "top_p", "must be in (0, 1] (1 disables)"
  if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 0:
    return "top_k", "must be an int >= 0 (0 disables)"
  return None


def check_decoding(*, temperature, top_p, top_k) -> None:
  """``decoding_problem`` as a ``ValueError`` naming the argument and the value given."""
  bad = decoding_problem(temperature=temperature, top_p=top_p, top_k=top_k)
  if bad is not None:
    value = dict(temperature=temperature, top_p=top_p, top_k=top_k)[bad[0]]
    raise ValueError(f"{bad[0]} {bad[1]}, got {value!r}")


def _check(cond: bool, key: str, msg: str) -> None:
  if not cond:
    raise ConfigError(f"{key}: {msg}")


@dataclass(frozen=True)
class ModelConfigSection:
  path: str | None = None          # local Hugging Face checkpoint directory (config.json, tokenizer, safetensors)
  arch: Mapping[str, Any] | None = None  # or: jaxent.models.ModelConfig fields for a randomly initialised model
  dtype: Literal["float32", "bfloat16"] = "float32"  # compute dtype (activations, KV cache; logits stay float32)
  # storage dtype of the parameters and Adam state; null = dtype. float32 with dtype bfloat16:
  # bfloat16 matmuls over float32 master weights (small lr steps are not rounded away)
  param_dtype: Literal["float32", "bfloat16"] | None = None
  remat: bool = False              # rematerialise each layer in the backward pass (saves activation memory)
  attention_chunk: int = 512       # longer sequences attend this many queries at a time (same result, chunk x S memory); 0 = whole
  init_seed: int = 0               # seed of the random init when `arch` is given

  @property
  def storage_dtype(self) -> str:
    """``param_dtype``, or ``dtype`` when it is not set."""
    return self.param_dtype or self.dtype

  def validate(self, key: str = "model") -> None:
    _check((self.path is None) != (self.arch is None), key,
           "give exactly one of model.path (a local HF directory) or model.arch (a config for random init)")
    _check(self.attention_chunk >= 0, f"{key}.attention_chunk",
           f"must be >= 0 (0 = whole attention), got {self.attention_chunk}")


@dataclass(frozen=True)
class DataConfig:
  task: Literal["jsonl", "arithmetic"] = "jsonl"  # a local JSONL/Parquet dataset, or the generated arithmetic task
  train_path: str | None = None    # JSONL or Parquet with prompt/answer fields (task=jsonl)
  eval_path: str | None = None     # held-out set for `eval_every` (task=jsonl)
  prompt_key: str = "prompt"       # field holding the prompt text
  answer_key: str = "answer"       # field holding the gold answer
  chat_template: bool = False      # wrap prompts with the tokenizer's chat template
  max_prompt_len: int = 512        # longer prompts are skipped and counted
  shuffle_seed: int = 0            # data order seed (a new permutation each epoch)
  # arithmetic task (task=arithmetic)
  num_operands: int = 3            # operands per prompt: ab+cd+ef=
  num_digits: int = 2              # digits per operand
  num_eval: int = 2048             # held-out prompts for evaluation

  def validate(self, key: str = "data") -> None:
    if self.task == "jsonl":
      _check(self.train_path is not None, f"{key}.train_path", "required when data.task is 'jsonl'")
    _check(self.max_prompt_len >= 1, f"{key}.max_prompt_len", "must be >= 1")
    _check(self.num_operands >= 2, f"{key}.num_operands", "must be >= 2")
    _check(1 <= self.num_digits <= 6, f"{key}.num_digits", "must be in [1, 6]")
    _check(self.num_eval >= 1, f"{key}.num_eval", "must be >= 1")


@dataclass(frozen=True)
class CorrectionConfig:
  """Rollout correction: the trainer's log pi_old against the sampler's log-probs."""
  level: Literal["token", "sequence"] = "token"   # per-token ratios, or one ratio per row
  # a float u: TIS, weights min(w, u); "lo_hi" (e.g. "0.5_5.0"): IcePop, 0 outside [lo, hi];
  # null: no importance weights (rejection only)
  threshold: float | str | None = 2.0
  # comma-separated "option:threshold" rejection masks, ANDed (e.g. "seq_mean_k1:0.999_1.001"); null = none
  rejection: str | None = None
  batch_normalize: bool = False                   # divide the weights by their batch mean


@dataclass(frozen=True)
class RolloutConfig:
  prompts_per_step: int = 32       # prompts sampled per RL step
  samples_per_prompt: int = 8      # responses per prompt (the GRPO group size)
  max_new_tokens: int = 16         # response length limit
  temperature: float = 1.0         # sampling temperature for rollouts
  top_p: float = 1.0               # nucleus sampling mass
  top_k: int = 0                   # 0 = off
  # prompts per sampler call: a step's prompts are generated in chunks of this many (each
  # with all its samples), so the KV cache holds chunk x samples_per_prompt rows, not the
  # whole step's; a last, shorter chunk is padded to the same shape (no recompile); 0 = all at once
  prompts_per_generate: int = 0
  filter_groups: bool = False      # DAPO-style: drop groups whose rewards are all equal (zero advantage)
  # DAPO dynamic sampling (with filter_groups): generate up to this many batches of
  # prompts_per_step prompts per step and train on the first prompts_per_step groups whose
  # rewards differ; all-equal groups fill any shortfall and are masked. 1 = no refill
  max_gen_batches: int = 1
  reward: str = "math"             # reward function name (jaxent.rewards)
  reward_timeout_s: float = 5.0    # per-response grading time limit
  scale_by_std: bool = True        # GRPO std scaling (False = Dr.GRPO)
  # generation engine: "continuous" (`slots` rows decoded together, refilled from a queue
  # as rows end), "static" (one batch decoded until its longest row ends) or "vllm" (an
  # in-process vLLM, weights synced after every update; pip install 'jaxent[vllm]').
  # Continuous is the default: 2.2-2.6x the static engine on long-tailed lengths and
  # within 4% of it on uniform ones (docs/BENCHMARKS.md), with identical rows.
  engine: str = "continuous"
  slots: int = 0                   # continuous engine: rows decoded together; 0 = a quarter of a call's rows
  decode_steps_per_call: int = 0   # continuous engine: most decode steps per device call; 0 = max_new_tokens
  # generation dtype: null = the model's; "bfloat16" samples from bfloat16 copies of the
  # weights (KV cache in bfloat16) while training keeps the model's float32 parameters
  compute_dtype: str | None = None
  vllm_dtype: str = "float32"      # vllm engine: compute dtype, "float32" or "bfloat16"
  vllm_kv_cache_bytes: int = 1 << 30  # vllm engine: KV cache size (checked against free memory at start)
  vllm_max_model_len: int = 0      # vllm engine: longest prompt + response; 0 = min(model's max positions, 4096)
  # importance weights / rejection against the sampler's log-probs (TIS, IcePop, rejection
  # masks; jaxent.losses.rollout_correction); null = off
  correction: CorrectionConfig | None = None

  def validate(self, key: str = "rollout") -> None:
    _check(self.prompts_per_step >= 1, f"{key}.prompts_per_step", "must be >= 1")
    _check(self.samples_per_prompt >= 1, f"{key}.samples_per_prompt", "must be >= 1")
    _check(self.max_new_tokens >= 1, f"{key}.max_new_tokens", "must be >= 1")
    bad = decoding_problem(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
    _check(bad is None, f"{key}.{bad and bad[0]}", bad and bad[1])
    _check(0 <= self.prompts_per_generate <= self.prompts_per_step, f"{key}.prompts_per_generate",
           f"must be in [0, rollout.prompts_per_step = {self.prompts_per_step}] "
           f"(0 generates all of a step's prompts at once), got {self.prompts_per_generate}")
    _check(self.reward_timeout_s > 0, f"{key}.reward_timeout_s", "must be > 0")
    _check(self.max_gen_batches >= 1, f"{key}.max_gen_batches", "must be >= 1")
    _check(self.max_gen_batches == 1 or self.filter_groups, f"{key}.max_gen_batches",
           f"> 1 refills filtered groups, so it needs {key}.filter_groups = true")
    _check(self.engine in ("static", "continuous", "vllm"), f"{key}.engine",
           f"must be 'static', 'continuous' or 'vllm', got {self.engine!r}")
    _check(self.vllm_dtype in ("float32", "bfloat16"), f"{key}.vllm_dtype",
           f"must be 'float32' or 'bfloat16', got {self.vllm_dtype!r}")
    _check(isinstance(self.vllm_kv_cache_bytes, int) and not isinstance(self.vllm_kv_cache_bytes, bool)
           and self.vllm_kv_cache_bytes >= 1, f"{key}.vllm_kv_cache_bytes",
           f"must be an int >= 1, got {self.vllm_kv_cache_bytes!r}")
    _check(isinstance(self.vllm_max_model_len, int) and not isinstance(self.vllm_max_model_len, bool)
           and self.vllm_max_model_len >= 0, f"{key}.vllm_max_model_len",
           f"must be an int >= 0 (0: the model's), got {self.vllm_max_model_len!r}")
    _check(isinstance(self.slots, int) and self.slots >= 0, f"{key}.slots",
           f"must be an int >= 0 (0: the engine's default), got {self.slots!r}")
    _check(isinstance(self.decode_steps_per_call, int) and self.decode_steps_per_call >= 0,
           f"{key}.decode_steps_per_call",
           f"must be an int >= 0 (0: max_new_tokens), got {self.decode_steps_per_call!r}")
    _check(self.compute_dtype in (None, "float32", "bfloat16"), f"{key}.compute_dtype",
           f"must be null, 'float32' or 'bfloat16', got {self.compute_dtype!r}")


@dataclass(frozen=True)
class AdaptiveEntropyConfig:
  """Skywork-OR1's adaptive entropy coefficient; it starts at ``loss.entropy_coef``."""
  target: float = 0.2              # entropy target (TRL entropy_target)
  delta: float = 0.005             # coefficient step per optimizer update (TRL entropy_coef_delta)
  min: float = 0.0                 # coefficient floor (TRL entropy_coef_min)
  max: float = 1.0                 # coefficient ceiling (TRL entropy_coef_max)

  def validate(self, key: str = "loss.adaptive_entropy") -> None:
    for name in ("target", "delta", "min", "max"):
      _check(getattr(self, name) >= 0, f"{key}.{name}", "must be >= 0")
    _check(self.min <= self.max, f"{key}.min", f"must be <= {key}.max ({self.max})")


@dataclass(frozen=True)
class LossConfig:
  name: Literal[LOSSES] = "ppo_clip"  # a jaxent.losses.POLICY_LOSSES family; GRPO / Clip-higher use ppo_clip
  agg: Literal["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"] = "token-mean"
  # PPO epsilons below / above 1; null = the family's default (0.2 / 0.2; GSPO 3e-4 / 4e-4,
  # GMPO 0.4 / 0.4). Clip-higher: clip_high 0.28
  clip_low: float | None = None
  clip_high: float | None = None
  dual_clip: float | None = None   # dual-clip constant c for negative advantages (paper: 10)
  ratio: float = 2e-4              # fraction of valid tokens the covariance rule selects
  cov_lb: float = 1.0              # Clip-Cov: lower covariance bound
  cov_ub: float = 5.0              # Clip-Cov: upper covariance bound
  kl_coef: float = 1.0             # KL-Cov: beta of the |log pi - log pi_old| penalty
  entropy_coef: float = 0.0        # entropy bonus (paper: 0)
  ref_kl_coef: float = 0.0         # KL to the reference policy (paper: 0); > 0 computes reference log-probs
  ref_kl_kind: Literal["k1", "k2", "k3"] = "k3"  # estimator of that KL
  # train on the valid tokens whose entropy is in the top fraction rho of the mini-batch
  # ("80/20", paper rho = 0.2); 1.0 = every token
  top_entropy_quantile: float = 1.0
  # adapt the entropy bonus's coefficient to an entropy target (starts at entropy_coef); null = fixed
  adaptive_entropy: AdaptiveEntropyConfig | None = None

  def validate(self, key: str = "loss") -> None:
    _check(self.clip_low is None or self.clip_low >= 0, f"{key}.clip_low", "must be >= 0 or null")
    _check(self.clip_high is None or self.clip_high >= 0, f"{key}.clip_high", "must be >= 0 or null")
    _check(0 < self.top_entropy_quantile <= 1, f"{key}.top_entropy_quantile",
           f"must be in (0, 1] (1 = every token), got {self.top_entropy_quantile}")
    if self.adaptive_entropy is not None:
      self.adaptive_entropy.validate(f"{key}.adaptive_entropy")
    _check(self.dual_clip is None or self.dual_clip > 1, f"{key}.dual_clip", "must be > 1 or null")
    _check(0 < self.ratio <= 1, f"{key}.ratio", "must be in (0, 1]")
    _check(self.cov_lb < self.cov_ub, f"{key}.cov_lb", f"must be < loss.cov_ub ({self.cov_ub})")
    _check(self.kl_coef >= 0, f"{key}.kl_coef", "must be >= 0")
    _check(self.entropy_coef >= 0, f"{key}.entropy_coef", "must be >= 0")
    _check(self.ref_kl_coef >= 0, f"{key}.ref_kl_coef", "must be >= 0")


@dataclass(frozen=True)
class OptimConfig:
  lr: float = 1e-6                 # peak learning rate (paper: 1e-6)
  warmup_steps: int = 0            # linear warm-up, in optimizer updates
  schedule: Literal["constant", "cosine"] = "constant"  # after warm-up
  weight_decay: float = 0.0        # AdamW decoupled weight decay
  b1: float = 0.9                  # Adam beta1
  b2: float = 0.999                # Adam beta2
  eps: float = 1e-8                # Adam epsilon
  grad_clip: float = 1.0           # global-norm gradient clipping (paper: 1.0)
  max_nonfinite: int = 5           # stop after this many non-finite updates in a row

  def validate(self, key: str = "optim") -> None:
    _check(self.lr > 0, f"{key}.lr", "must be > 0")
    _check(self.warmup_steps >= 0, f"{key}.warmup_steps", "must be >= 0")
    _check(self.weight_decay >= 0, f"{key}.weight_decay", "must be >= 0")
    _check(0 <= self.b1 < 1 and 0 <= self.b2 < 1, f"{key}.b1/b2", "must be in [0, 1)")
    _check(self.grad_clip > 0, f"{key}.grad_clip", "must be > 0")
    _check(self.max_nonfinite >= 1, f"{key}.max_nonfinite", "must be >= 1")


@dataclass(frozen=True)
class TrainConfig:
  steps: int = 100                 # RL steps (one rollout each)
  ppo_epochs: int = 1              # passes over each rollout
  mini_batches: int = 1            # optimizer updates per epoch; covariance selection spans one mini-batch
  micro_batches: int = 1           # gradient-accumulation chunks per mini-batch (does not change the gradient)
  seed: int = 0                    # sampling, selection and init randomness
  log_every: int = 1               # metrics to metrics.jsonl / TensorBoard every N steps
  eval_every: int = 0              # held-out evaluation every N steps (0 = off)
  ckpt_every: int = 0              # checkpoint every N steps (0 = only at the end)
  keep_checkpoints: int = 3        # checkpoints kept on disk
  progress: bool = True            # progress bar
  # on SIGTERM/SIGINT: finish the step and save a checkpoint if that fits in this many seconds
  # (spot/preemptible VMs give about 30 s), then exit 75; 0 = exit at once without saving
  preempt_grace_s: float = 25.0
  # where metrics go: jsonl (metrics.jsonl, the run's record), tensorboard (tb/), wandb
  # (Weights & Biases: offline into wandb/ unless WANDB_API_KEY or WANDB_MODE says otherwise)
  loggers: tuple[str, ...] = ("jsonl", "tensorboard")
  wandb_project: str = "jaxent"    # W&B project (the run name is `name`)

  def validate(self, key: str = "train") -> None:
    for name in ("steps", "ppo_epochs", "mini_batches", "micro_batches", "log_every", "keep_checkpoints"):
      _check(getattr(self, name) >= 1, f"{key}.{name}", "must be >= 1")
    for name in self.loggers:
      _check(name in LOGGERS, f"{key}.loggers", f"{name!r} is not a logger; choose from {list(LOGGERS)}")
    _check(len(set(self.loggers)) == len(self.loggers), f"{key}.loggers",
           f"{list(self.loggers)} names a logger twice")
    _check(bool(self.wandb_project.strip()), f"{key}.wandb_project", "must be a non-empty string")
    _check(self.eval_every >= 0, f"{key}.eval_every", "must be >= 0")
    _check(self.ckpt_every >= 0, f"{key}.ckpt_every", "must be >= 0")
    _check(math.isfinite(self.preempt_grace_s) and self.preempt_grace_s >= 0,
           f"{key}.preempt_grace_s", "must be a finite number >= 0 (0: exit at once without saving)")


@dataclass(frozen=True)
class MeshConfig:
  # data-parallel axis; -1: the remaining devices (with one process it shrinks until the
  # micro-batch divides data x fsdp, with a printed note; several processes use every device)
  data: int = -1
  fsdp: int = 1                    # fully-sharded data-parallel axis
  tensor: int = 1                  # tensor-parallel axis

  def validate(self, key: str = "mesh") -> None:
    for name in ("data", "fsdp", "tensor"):
      v = getattr(self, name)
      _check(v == -1 or v >= 1, f"{key}.{name}", "must be >= 1 or -1")


@dataclass(frozen=True)
class Config:
  model: ModelConfigSection = field(default_factory=ModelConfigSection)
  data: DataConfig = field(default_factory=DataConfig)
  rollout: RolloutConfig = field(default_factory=RolloutConfig)
  loss: LossConfig = field(default_factory=LossConfig)
  optim: OptimConfig = field(default_factory=OptimConfig)
  train: TrainConfig = field(default_factory=TrainConfig)
  mesh: MeshConfig = field(default_factory=MeshConfig)
  name: str = "run"                # run name (logs)

  def validate(self) -> "Config":
    parts = self.name.replace("\\", "/").split("/")
    _check(bool(self.name.strip()) and not self.name.startswith(("/", "~")) and "\0" not in self.name
           and not any(p in ("", ".", "..") for p in parts), "name",
           f"must be a relative name (the run directory is runs/<name>), without '..', a leading "
           f"'/' or '~', or empty parts; got {self.name!r} (use --run-dir for another place)")
    for f in dataclasses.fields(self):
      v = getattr(self, f.name)
      if hasattr(v, "validate"):
        v.validate(f.name)
    rows = self.rows_per_step
    mb = self.train.mini_batches
    _check(rows % mb == 0, "train.mini_batches",
           f"{mb} does not divide the {rows} responses per step "
           f"(rollout.prompts_per_step x rollout.samples_per_prompt)")
    _check((rows // mb) % self.train.micro_batches == 0, "train.micro_batches",
           f"{self.train.micro_batches} does not divide the mini-batch of {rows // mb} responses")
    return self

  @property
  def rows_per_step(self) -> int:
    """Responses per RL step: ``rollout.prompts_per_step * rollout.samples_per_prompt``."""
    return self.rollout.prompts_per_step * self.rollout.samples_per_prompt

  @property
  def mini_batch_rows(self) -> int:
    """Rows of one optimizer update: ``rows_per_step / train.mini_batches``."""
    return self.rows_per_step // self.train.mini_batches

  @property
  def micro_batch_rows(self) -> int:
    """Rows of one gradient-accumulation chunk: ``mini_batch_rows / train.micro_batches``."""
    return self.mini_batch_rows // self.train.micro_batches

  def to_dict(self) -> dict:
    """Plain YAML/JSON values: sections as dicts, tuples as lists."""
    return dataclasses.asdict(self, dict_factory=lambda items: {k: _plain(v) for k, v in items})

  def to_yaml(self) -> str:
    return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _plain(v: Any) -> Any:
  return [_plain(x) for x in v] if isinstance(v, (tuple, list)) else v


# --------------------------------------------------------------------------
# dict -> dataclass with type checks


_FLOAT_RE = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _type_name(tp) -> str:
  return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
  origin = typing.get_origin(tp)
  args = typing.get_args(tp)
  if tp is Any:
    return value
  if origin is Literal:
    if value not in args:
      raise ConfigError(f"{key}: {value!r} is not allowed; choose one of {list(args)}")
    return value
  if origin in (typing.Union, types.UnionType):
    if value is None and type(None) in args:
      return None
    errors = []
    for a in args:
      if a is type(None):
        continue
      try:
        return _coerce(value, a, key)
      except ConfigError as e:
        errors.append(str(e))
    raise ConfigError(errors[0] if len(errors) == 1 else
                      f"{key}: {value!r} does not match {_type_name(tp)}")
  if dataclasses.is_dataclass(tp):
    if isinstance(value, tp):
      return value
    if not isinstance(value, Mapping):
      raise ConfigError(f"{key}: expected a mapping of {sorted(f.name for f in dataclasses.fields(tp))}, "
                        f"got {type(value).__name__}")
    return _build(tp, value, key)
  if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
      raise ConfigError(f"{key}: expected a list, got {value!r}")
    return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
  if origin in (collections.abc.Mapping, dict) or tp in (dict, Mapping):
    if not isinstance(value, Mapping):
      raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
    return dict(value)
  if tp is bool:
    if isinstance(value, bool):
      return value
    raise ConfigError(f"{key}: expected true or false, got {value!r}")
  if tp is int:
    if isinstance(value, int) and not isinstance(value, bool):
      return value
    raise ConfigError(f"{key}: expected an integer, got {value!r}")
  if tp is float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
      return float(value)
    # YAML 1.1 reads `1e-6` (no dot) as a string; accept numeric strings.
    if isinstance(value, str) and _FLOAT_RE.fullmatch(value.strip()):
      return float(value)
    raise ConfigError(f"{key}: expected a number, got {value!r}")
  if tp is str:
    if isinstance(value, str):
      return value
    raise ConfigError(f"{key}: expected a string, got {value!r}")
  raise ConfigError(f"{key}: unsupported type {_type_name(tp)}")


def _build(cls, data: Mapping[str, Any], prefix: str = ""):
  hints = typing.get_type_hints(cls)
  names = [f.name for f in dataclasses.fields(cls)]
  kwargs = {}
  for k, v in data.items():
    full = f"{prefix}.{k}" if prefix else str(k)
    if k not in names:
      close = difflib.get_close_matches(str(k), names, n=3, cutoff=0.5)
      hint = f"; did you mean {' or '.join(repr((prefix + '.' if prefix else '') + c) for c in close)}?" if close else ""
      raise ConfigError(f"{full}: unknown key{hint} (valid keys: {', '.join(names)})")
    kwargs[k] = _coerce(v, hints[k], full)
  return cls(**kwargs)


def _parse_scalar(text: str) -> Any:
  try:
    return yaml.safe_load(text)
  except yaml.YAMLError:
    return text


def apply_overrides(data: dict, overrides: Sequence[str]) -> dict:
  """Applies ``a.b=c`` overrides to a nested dict (values parsed as YAML)."""
  data = _deep_copy(data)
  for item in overrides:
    if "=" not in item:
      raise ConfigError(f"override {item!r}: expected key=value, e.g. loss.name=kl_cov")
    key, text = item.split("=", 1)
    parts = key.strip().split(".")
    node = data
    for p in parts[:-1]:
      nxt = node.setdefault(p, {})
      if not isinstance(nxt, dict):
        raise ConfigError(f"override {key}: {p!r} is not a section")
      node = nxt
    node[parts[-1]] = _parse_scalar(text)
  return data


def _deep_copy(d):
  if isinstance(d, Mapping):
    return {k: _deep_copy(v) for k, v in d.items()}
  return d


def from_dict(data: Mapping[str, Any] | None, overrides: Sequence[str] = ()) -> Config:
  data = apply_overrides(dict(data or {}), overrides)
  return _build(Config, data).validate()


def load(path: str, overrides: Sequence[str] = ()) -> Config:
  """Loads a YAML config file, applies overrides and validates."""
  try:
    with open_regular(path, "r", what="config file", encoding="utf-8") as f:
      data = yaml.safe_load(f)
  except FileNotFoundError:
    raise ConfigError(f"config file not found: {path}") from None
  except InputFileError as e:
    raise ConfigError(str(e)) from None
  except UnicodeDecodeError as e:
    raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
  except OSError as e:
    raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from None
  except yaml.YAMLError as e:
    raise ConfigError(f"{path}: not valid YAML: {e}") from None
  if data is not None and not isinstance(data, Mapping):
    raise ConfigError(f"{path}: the top level must be a mapping of sections")
  return from_dict(data or {}, overrides)
