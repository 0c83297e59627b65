"""Tiny models, batches and loop configs shared by the trainer tests.

One definition, so tests that should compile the same programs (and share the
session's compilation cache) cannot drift apart.
"""
import copy
import json
import os

import numpy as np
import yaml

from jaxent.types import Batch

# A 1-layer Qwen2 for loop tests on the generated arithmetic task.
TINY_ARCH = {"model_type": "qwen2", "hidden_size": 32, "num_layers": 1, "num_heads": 4,
             "num_kv_heads": 2, "head_dim": 8, "intermediate_size": 64, "tie_word_embeddings": True}
# A 1-layer Qwen2 with two 16-wide heads: the model of the loop and reliability tests' own configs.
TWO_HEAD_ARCH = {"model_type": "qwen2", "hidden_size": 32, "num_layers": 1, "num_heads": 2,
                 "num_kv_heads": 1, "head_dim": 16, "intermediate_size": 64,
                 "tie_word_embeddings": True}
LOOP_BASE = {
    "name": "tiny",
    "model": {"arch": TINY_ARCH},
    "data": {"task": "arithmetic", "num_operands": 2, "num_digits": 2, "num_eval": 8},
    "rollout": {"prompts_per_step": 4, "samples_per_prompt": 4, "max_new_tokens": 4,
                "reward": "arithmetic_exact"},
    "loss": {"name": "clip_cov", "ratio": 0.1, "cov_lb": -100.0, "cov_ub": 100.0},
    "optim": {"lr": 1e-3, "eps": 1e-3},
    "train": {"steps": 1, "mini_batches": 2, "micro_batches": 1, "progress": False},
}


# The run config of the reliability, preemption, run-directory and checkpoint
# tests. The random tiny model never answers right (all rewards 0, advantages
# 0): the entropy bonus gives every update a gradient that depends on the
# sampled tokens, so the parameters carry the data order and RNG. The files
# differ only in values that are not compiled in (name, steps, checkpoint
# cadence), so one compile serves them all.
RUN_BASE = {
    "name": "rel",
    "model": {"arch": TWO_HEAD_ARCH},
    "data": {"task": "arithmetic", "num_operands": 2, "num_digits": 2, "num_eval": 16},
    "rollout": {"prompts_per_step": 4, "samples_per_prompt": 4, "max_new_tokens": 4,
                "reward": "arithmetic_exact"},
    "loss": {"name": "kl_cov", "ratio": 0.1, "entropy_coef": 0.01},
    "optim": {"lr": 1e-3, "max_nonfinite": 2},
    "train": {"steps": 8, "mini_batches": 1, "micro_batches": 1, "eval_every": 0, "ckpt_every": 2,
              "progress": False},
}


def run_config(name: str, **train) -> dict:
  """``RUN_BASE`` named ``name`` with some ``train`` values changed (a deep copy)."""
  out = copy.deepcopy(RUN_BASE)
  out["name"] = name
  out["train"].update(train)
  return out


def write_config(tmp: str, data: dict) -> str:
  """``data`` as a new YAML file in ``tmp``; returns its path."""
  path = os.path.join(tmp, f"cfg_{len(os.listdir(tmp))}.yaml")
  with open(path, "w") as f:
    yaml.safe_dump(data, f)
  return path


def metrics_rows(run_dir: str) -> list[dict]:
  with open(os.path.join(run_dir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def loop_config(**sections) -> dict:
  """``LOOP_BASE`` with some sections updated (a deep copy): loop_config(train={"steps": 2})."""
  out = copy.deepcopy(LOOP_BASE)
  for name, value in sections.items():
    if isinstance(value, dict):
      out.setdefault(name, {}).update(value)
    else:
      out[name] = value
  return out


def random_batch(vocab_size: int, b: int, p: int, r: int, seed: int = 0) -> Batch:
  """A ragged NumPy Batch: left-padded prompts of 2..p tokens, responses of 1..r tokens,
  row 3 an empty response; advantages one per row, old log-probs in log(0.02..0.2)."""
  rng = np.random.default_rng(seed)
  plen = rng.integers(2, p + 1, size=b)
  rlen = rng.integers(1, r + 1, size=b)
  rlen[3] = 0                                       # an empty response row
  tokens = np.zeros((b, p + r), np.int32)
  attn = np.zeros((b, p + r), np.int32)
  pos = np.zeros((b, p + r), np.int32)
  mask = np.zeros((b, r), np.float32)
  for i in range(b):
    off = p - plen[i]
    tokens[i, off:p + rlen[i]] = rng.integers(1, vocab_size, size=plen[i] + rlen[i])
    attn[i, off:p + rlen[i]] = 1
    pos[i, off:] = np.arange(p + r - off)
    mask[i, :rlen[i]] = 1
  adv = rng.normal(size=(b, 1)).astype(np.float32) * 2 * mask
  old = (np.log(rng.uniform(0.02, 0.2, size=(b, r))) * mask).astype(np.float32)
  return Batch(tokens=tokens, positions=pos, attention_mask=attn, response_mask=mask, advantages=adv,
               old_log_prob=old, ref_log_prob=np.zeros((b, r), np.float32))


def save_char_model(path, vocab, *, eos_id: int, seed: int, **arch) -> str:
  """A tiny random Qwen2 HF directory with a one-token-per-character tokenizer.

  ``vocab`` lists the tokens (``vocab[0]`` the unknown token, ``vocab[eos_id]``
  the EOS); text is split into single characters and decoded without spaces.
  ``arch`` sets ``models.ModelConfig`` fields beyond the shared defaults.
  """
  from tokenizers import Tokenizer, decoders, models as tmodels, pre_tokenizers
  from transformers import PreTrainedTokenizerFast

  from jaxent import models
  t = Tokenizer(tmodels.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token=vocab[0]))
  t.pre_tokenizer = pre_tokenizers.Split("", "isolated")
  t.decoder = decoders.Fuse()
  tok = PreTrainedTokenizerFast(tokenizer_object=t, unk_token=vocab[0], eos_token=vocab[eos_id])
  kw = dict(model_type="qwen2", vocab_size=len(vocab), hidden_size=32, num_layers=1,
            intermediate_size=64, eos_token_id=eos_id)
  kw.update(arch)
  models.save_pretrained(models.init_model(models.ModelConfig(**kw), seed=seed), str(path),
                         tokenizer=tok)
  return str(path)
