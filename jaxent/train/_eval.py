"""Evaluation of a policy on a local benchmark, and loading a trained run.

``mean@k`` is the mean reward over ``k`` samples per prompt; ``pass@k`` the
fraction of prompts with at least one correct sample among them (the
unbiased estimator with n = k). With ``temperature = 0`` one greedy sample
is taken (k = 1).
"""
from __future__ import annotations

import os

import jax
import numpy as np

from jaxent import config as config_lib
from jaxent import data as data_lib
from jaxent import models, rewards, sampler
from jaxent.train._build import SetupError, load_policy
from jaxent.train._checkpoint import Checkpointer
from jaxent.train._step import init_state, make_optimizer


def load_run(run_dir: str, step: int | None = None):
  """(config, model with the checkpoint's params, tokenizer, step) of a run directory."""
  cfg_path = os.path.join(run_dir, "config.yaml")
  if not os.path.isfile(cfg_path):
    raise SetupError(f"{run_dir} is not a run directory: {cfg_path} is missing")
  cfg = config_lib.load(cfg_path)
  model, tok = load_policy(cfg)
  ck_dir = os.path.join(run_dir, "checkpoints")
  if not os.path.isdir(ck_dir):
    raise SetupError(f"{run_dir} has no checkpoints/ directory")
  ckpt = Checkpointer(ck_dir)
  try:
    step = ckpt.latest_step() if step is None else step
    if step is None:
      raise SetupError(f"no complete checkpoint under {ck_dir}")
    tr = cfg.train
    tx = make_optimizer(cfg.optim, tr.steps * tr.ppo_epochs * tr.mini_batches)
    abstract = jax.eval_shape(lambda p: init_state(p, tx, jax.random.PRNGKey(0)), model.params)
    try:
      state, _ = ckpt.restore(step, abstract)
    except Exception as e:  # noqa: BLE001 - orbax raises many kinds for a damaged checkpoint
      raise SetupError(f"cannot restore checkpoint {step} in {ck_dir}: {e}") from e
  finally:
    ckpt.close()
  return cfg, model.replace(params=state.params), tok, step


def pass_at_k(correct: np.ndarray, k: int) -> float:
  """Unbiased pass@k (Chen et al., 2021) from ``correct`` [prompts, n] with n >= k."""
  correct = np.asarray(correct, bool)
  n = correct.shape[1]
  if not 1 <= k <= n:
    raise ValueError(f"k={k} must be in [1, {n}] (samples per prompt)")
  c = correct.sum(axis=1)
  # 1 - C(n-c, k) / C(n, k), computed as a product for stability
  out = np.ones(len(c))
  for i, ci in enumerate(c):
    if n - ci < k:
      continue
    out[i] = 1.0 - np.prod(1.0 - k / np.arange(n - ci + 1, n + 1))
  return float(out.mean())


def evaluate_benchmark(model, tok, path: str, *, k: int = 1, temperature: float = 0.0,
                       top_p: float = 1.0, max_new_tokens: int = 1024, reward: str = "math",
                       prompt_key: str = "prompt", answer_key: str = "answer",
                       chat_template: bool = False, max_prompt_len: int = 2048,
                       batch_size: int = 64, seed: int = 0, timeout_s: float = 5.0,
                       skip_special_tokens: bool = True) -> dict:
  """mean@k and pass@k of ``model`` on a local JSONL benchmark."""
  if temperature == 0:
    k = 1
  ps = data_lib.load_prompts(path, tok, prompt_key=prompt_key, answer_key=answer_key,
                             max_prompt_len=max_prompt_len, chat_template=chat_template)
  prompts = [list(e.prompt_ids) for e in ps.examples]
  answers = [e.answer for e in ps.examples]
  key = jax.random.PRNGKey(seed)
  eos = tok.eos_token_id
  rewards_all = []
  fails = timeouts = 0
  for i in range(0, len(prompts), batch_size):
    out = sampler.generate(model, prompts[i:i + batch_size], max_new_tokens=max_new_tokens,
                           temperature=temperature, top_p=top_p, eos_id=eos, num_samples=k,
                           key=jax.random.fold_in(key, i))
    toks, mask = jax.device_get((out.tokens, out.mask))
    texts = [tok.decode([int(t) for t in row[m > 0]], skip_special_tokens=skip_special_tokens)
             for row, m in zip(toks, mask)]
    gold = [a for a in answers[i:i + batch_size] for _ in range(k)]
    res = rewards.grade_batch(reward, texts, gold, timeout_s=timeout_s)
    rewards_all.append(res.rewards.reshape(-1, k))
    fails += res.failures
    timeouts += res.timeouts
  r = np.concatenate(rewards_all)
  return {"benchmark": os.path.basename(path), "prompts": len(prompts), "k": k,
          "temperature": temperature, f"mean@{k}": float(r.mean()),
          f"pass@{k}": pass_at_k(r >= 0.5, k), "reward_failures": fails,
          "reward_timeouts": timeouts, "skipped_rows": ps.stats.rows - ps.stats.valid}


def load_model_or_run(path: str, dtype: str = "float32"):
  """A HF directory (config.json) or a jaxent run directory (config.yaml + checkpoints)."""
  if os.path.isfile(os.path.join(path, "config.yaml")):
    cfg, model, tok, _ = load_run(path)
    return model, tok, cfg
  if os.path.isfile(os.path.join(path, "config.json")):
    try:
      return models.from_pretrained(path, dtype=dtype), models.load_tokenizer(path), None
    except (FileNotFoundError, ValueError, OSError) as e:
      raise SetupError(f"cannot load {path}: {e}") from e
  raise SetupError(f"{path} is neither a Hugging Face directory (config.json) nor a jaxent run "
                   f"directory (config.yaml)")

