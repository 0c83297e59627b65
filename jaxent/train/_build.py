"""Config -> the loop's Components: model, tokenizer, data, rewards, eval set.

Errors a user can fix (missing files, empty data, unreadable checkpoints)
surface as :class:`SetupError` with a message naming the file; the CLI turns
it into exit code 2.
"""
from __future__ import annotations

import importlib.util
import os

import jax

from jaxent import data as data_lib
from jaxent import models, rewards, rollout, sharding
from jaxent.config import Config
from jaxent.errors import SetupError
from jaxent.train._checkpoint import run_path
from jaxent.train._loop import Components


def _run_model_fields(cfg: Config) -> dict:
  """The ``ModelConfig`` fields a ``config.json`` does not hold, from the run's ``model:``."""
  mc = cfg.model
  return dict(dtype=mc.dtype, param_dtype=mc.storage_dtype, remat=mc.remat,
              attention_chunk=mc.attention_chunk)


def _require_model_dir(path: str) -> None:
  if not os.path.isdir(path):
    raise SetupError(f"model.path: {path} is not a directory")


def model_config(cfg: Config):
  """The run's ``models.ModelConfig``, without weights (``config.json`` only for ``model.path``).

  Fields that are not in ``config.json`` (``dtype``, ``param_dtype``,
  ``remat``, ``attention_chunk``) come from the run config's ``model:`` section.
  """
  mc = cfg.model
  jaxent_fields = _run_model_fields(cfg)
  if mc.path is not None:
    _require_model_dir(mc.path)
    try:
      return models.load_config(mc.path, **jaxent_fields)
    except (FileNotFoundError, ValueError, OSError) as e:
      raise SetupError(f"model.path: cannot read the model config in {mc.path}: {e}") from e
  if cfg.data.task != "arithmetic":
    raise SetupError("model.arch builds a random model without a tokenizer; use it with "
                     "data.task=arithmetic, or give model.path (a HF directory with a tokenizer)")
  arch = dict(mc.arch or {})
  arch.setdefault("vocab_size", data_lib.arithmetic.CharTokenizer().vocab_size)
  for name, value in jaxent_fields.items():
    arch.setdefault(name, value)
  try:
    return models.ModelConfig(**arch)
  except (TypeError, ValueError) as e:
    raise SetupError(f"model.arch: {e}") from e


def load_policy(cfg: Config, mesh=None, *, weights: bool = True):
  """(model, tokenizer) from ``model.path`` or ``model.arch``.

  With ``mesh``, a ``model.path`` checkpoint is read shard by shard straight
  into the trainer's parameter layout on ``mesh`` (``models.param_shardings``):
  no parameter passes whole through the host or one device. With
  ``weights=False`` nothing is read or initialised: the model's params are
  ``jax.ShapeDtypeStruct``s (e.g. the target of a checkpoint restore).
  """
  mc = cfg.model
  if not weights:
    mcfg = model_config(cfg)
    model = models.Model(params=models.param_shapes(mcfg), config=mcfg)
  elif mc.path is None:
    model = models.init_model(model_config(cfg), seed=mc.init_seed)
  else:
    _require_model_dir(mc.path)
    try:
      model = models.from_pretrained(mc.path, dtype=mc.dtype, param_dtype=mc.storage_dtype,
                                     mesh=mesh)
    except (FileNotFoundError, ValueError, OSError) as e:
      raise SetupError(f"model.path: cannot load {mc.path}: {e}") from e
    # jaxent-only fields (not in config.json) come from the run config.
    model = model.replace(config=model.config.replace(**_run_model_fields(cfg)))
  if mc.path is None:
    return model, data_lib.arithmetic.CharTokenizer()
  try:
    tok = models.load_tokenizer(mc.path)
  except Exception as e:  # noqa: BLE001 - transformers raises many kinds
    raise SetupError(f"model.path: no usable tokenizer in {mc.path}: {e}") from e
  return model, tok


def arithmetic_files(cfg: Config, directory: str, *, num_train: int = 50_000) -> tuple[str, str]:
  """Writes the generated task's train and held-out JSONL (read back by the data pipeline).

  The files go to ``directory`` itself: a name there that is a symlink to
  elsewhere is refused (``RunDirError``) rather than written through.
  """
  d = cfg.data
  task = data_lib.arithmetic.ArithmeticTask(num_operands=d.num_operands, num_digits=d.num_digits)
  os.makedirs(directory, exist_ok=True)
  n_train = min(num_train, int(0.5 * task.num_problems))
  try:
    train = task.write_jsonl(run_path(directory, "train.jsonl"), n_train, seed=d.shuffle_seed)
    held = task.write_jsonl(run_path(directory, "heldout.jsonl"), d.num_eval,
                            seed=d.shuffle_seed + 1, split="heldout")
  except ValueError as e:  # e.g. more held-out problems asked than the task has
    raise SetupError(f"data.num_eval / data.num_digits / data.num_operands: {e}") from e
  return train, held


def train_mesh(cfg: Config):
  """The mesh ``train`` will run on (``None`` for a ``model.arch`` config).

  ``_loop.train`` plans its mesh from the config, the job's devices and the
  model config; both steps are deterministic, so computing them here gives the
  same mesh, and a checkpoint loaded onto it is already in the train state's
  layout (the loop's copy onto the mesh is then device-local).
  A config that does not fit the devices raises ``ConfigError`` here.
  """
  if cfg.model.path is None:
    return None  # random init is small
  plan = sharding.plan_mesh(cfg, jax.device_count(), process_count=jax.process_count(),
                          model_config=model_config(cfg))
  return plan.make_mesh()


def build_components(cfg: Config, run_dir: str, *, params=None, process_index: int = 0,
                     process_count: int = 1) -> Components:
  """Everything ``train`` needs, from the config (``params`` overrides the initial weights).

  A ``model.path`` checkpoint is loaded onto the training mesh (``train_mesh``).
  """
  if "wandb" in cfg.train.loggers and importlib.util.find_spec("wandb") is None:
    raise SetupError("train.loggers: 'wandb' needs the wandb package: pip install 'jaxent[wandb]' "
                     "(or drop wandb from train.loggers)")
  model, tok = load_policy(cfg, mesh=train_mesh(cfg))
  d = cfg.data
  if d.task == "arithmetic":
    try:
      train_path, eval_path = arithmetic_files(cfg, run_path(run_dir, "data"))
    except OSError as e:  # run directory under a file, a symlink out of it, disk full
      raise SetupError(f"run directory {run_dir}: cannot write the generated task's data: {e}") from e
  else:
    train_path, eval_path = d.train_path, d.eval_path
  dcfg = data_lib.PromptDataConfig(
      path=train_path, prompts_per_step=cfg.rollout.prompts_per_step, prompt_key=d.prompt_key,
      answer_key=d.answer_key, max_prompt_len=d.max_prompt_len, chat_template=d.chat_template,
      seed=d.shuffle_seed)
  try:
    it = data_lib.make_prompt_iterator(dcfg, tok, process_index=process_index,
                                       process_count=process_count)
    eval_set = None
    if eval_path is not None:
      ps = data_lib.load_prompts(eval_path, tok, prompt_key=d.prompt_key, answer_key=d.answer_key,
                                 max_prompt_len=d.max_prompt_len, chat_template=d.chat_template)
      eval_set = ([e.prompt_ids for e in ps.examples], [e.answer for e in ps.examples])
  except data_lib.DataError as e:
    raise SetupError(str(e)) from e

  reward_name, timeout = cfg.rollout.reward, cfg.rollout.reward_timeout_s
  rewards.reward_spec(reward_name)  # unknown name -> ValueError listing the names, before any work

  def grade(texts, answers):
    return rewards.grade_batch(reward_name, texts, answers, timeout_s=timeout)

  class _Prompts:
    def __next__(self):
      b = next(it)
      return b.prompt_ids, b.answers

    def get_state(self):
      return it.get_state()

    def set_state(self, state):
      it.set_state(state)

  def counters():
    s = it.stats
    return {k: v for k, v in vars(s).items() if isinstance(v, (int, float))} if s is not None else {}

  # The arithmetic grader needs the EOS character ('$': a complete answer);
  # HF chat tokenizers' special tokens mean nothing to the math grader.
  skip_special = d.task != "arithmetic"

  def decode(ids):
    return tok.decode(ids, skip_special_tokens=skip_special)

  pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
  return Components(
      model_config=model.config, params=model.params if params is None else params,
      task=rollout.Task(decode=decode, grade=grade, pad_id=int(pad), eos_id=tok.eos_token_id),
      prompts=_Prompts(), eval_set=eval_set, counters=counters)
