"""configs/: every YAML validates; the paper recipes hold the paper's values.

The expected values below are written from the paper's recipe (Cui et al.
2025, section "The paper's recipe" of the project's REFERENCE.md), not read
from the files under test.
"""
from __future__ import annotations

import dataclasses
import re
import shlex
from pathlib import Path

import pytest

from jaxent import config as C

ROOT = Path(__file__).resolve().parents[1]
# configs/study/ holds study files (jaxent study), validated by tests/test_study.py.
CONFIGS = sorted(p for p in (ROOT / "configs").rglob("*.yaml")
                 if (ROOT / "configs" / "study") not in p.parents)
PAPER = ROOT / "configs" / "paper"

MODELS = ("7b", "32b")
METHODS = ("grpo", "clip-higher", "clip-cov", "kl-cov")

# The paper's recipe, shared by every model and method.
COMMON = {
    "data.task": "jsonl",                 # DAPO-Math-17k, local
    "data.max_prompt_len": 2048,          # max prompt 2048
    "rollout.prompts_per_step": 256,      # 256 prompts
    "rollout.samples_per_prompt": 8,      # x 8 responses
    "rollout.max_new_tokens": 8192,       # max response 8192
    "rollout.temperature": 1.0,
    "rollout.top_p": 1.0,
    "rollout.top_k": 0,                   # no top-k truncation
    "rollout.filter_groups": True,        # DAPO filtering of all-equal groups
    "rollout.max_gen_batches": 10,        # ... refilled from up to 10 batches (max_num_gen_batches)
    "rollout.reward": "math",
    "rollout.scale_by_std": True,         # GRPO advantage
    "loss.agg": "token-mean",
    "loss.entropy_coef": 0.0,             # no entropy bonus
    "loss.ref_kl_coef": 0.0,              # no KL loss
    "optim.lr": 1e-6,
    "optim.grad_clip": 1.0,
    "optim.warmup_steps": 0,
    "optim.schedule": "constant",
    "optim.weight_decay": 0.0,
    "train.ppo_epochs": 1,
    "train.mini_batches": 8,              # 8 updates per rollout (mini-batch of 32 prompts)
}

METHOD = {
    "grpo": {"loss.name": "ppo_clip", "loss.clip_low": 0.2, "loss.clip_high": 0.2,
             "loss.dual_clip": 10.0},
    "clip-higher": {"loss.name": "ppo_clip", "loss.clip_low": 0.2, "loss.clip_high": 0.28,
                    "loss.dual_clip": 10.0},
    # Clip-Cov: PPO-clip with epsilon = 1 and no dual clip; ratio 2e-4, band (1, 5).
    "clip-cov": {"loss.name": "clip_cov", "loss.clip_low": 1.0, "loss.clip_high": 1.0,
                 "loss.dual_clip": None, "loss.ratio": 2e-4, "loss.cov_lb": 1.0, "loss.cov_ub": 5.0},
    # KL-Cov: beta = 1; the ratio depends on the model (below).
    "kl-cov": {"loss.name": "kl_cov", "loss.kl_coef": 1.0},
}
KL_COV_RATIO = {"7b": 2e-3, "32b": 2e-4}
MODEL_DIR = {"7b": "Qwen2.5-7B", "32b": "Qwen2.5-32B"}

# Devices of the recipe's mesh (a v5p-128 = 64 chips, a v5p-512 = 256 chips)
# and of the GPU variant each header documents (one 8xH100 node for 7B, four
# for 32B), and the GPU variant's rows per data x fsdp shard per micro-batch
# (7B: 4 rows per GPU; 32B: 2 rows per tensor pair).
TPU_DEVICES = {"7b": 64, "32b": 256}
GPU_DEVICES = {"7b": 8, "32b": 32}
GPU_ROWS = {"7b": 4, "32b": 2}


def get(cfg, dotted):
  obj = cfg
  for part in dotted.split("."):
    obj = getattr(obj, part)
  return obj


def paper_path(model, method):
  return PAPER / f"qwen2.5-{model}-{method}.yaml"


def mesh_devices(cfg):
  m = cfg.mesh
  assert -1 not in (m.data, m.fsdp, m.tensor), "a recipe names its mesh in full"
  return m.data * m.fsdp * m.tensor


def rows_per_device_per_micro_batch(cfg):
  rows = cfg.rollout.prompts_per_step * cfg.rollout.samples_per_prompt
  micro_rows = rows // cfg.train.mini_batches // cfg.train.micro_batches
  batch_devices = cfg.mesh.data * cfg.mesh.fsdp
  assert micro_rows % batch_devices == 0, (micro_rows, batch_devices)
  return micro_rows // batch_devices


def gpu_overrides(path):
  """The `--set` overrides of the GPU command documented in the file's header."""
  name = f"configs/paper/{path.name}"
  lines = [l for l in path.read_text().splitlines()
           if re.match(rf"#\s+jaxent train {re.escape(name)} --set ", l)]
  assert len(lines) == 1, f"{path.name}: expected one documented GPU command, got {lines}"
  argv = shlex.split(lines[0].lstrip("# "))[3:]
  assert argv[0::2] == ["--set"] * (len(argv) // 2), argv
  return argv[1::2]


@pytest.mark.parametrize("path", CONFIGS, ids=[str(p.relative_to(ROOT)) for p in CONFIGS])
def test_every_config_validates(path):
  cfg = C.load(str(path))
  assert cfg.to_dict()  # a complete, validated Config


def test_the_eight_recipes_exist():
  assert sorted(p.name for p in PAPER.glob("*.yaml")) == sorted(
      paper_path(m, k).name for m in MODELS for k in METHODS)


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("method", METHODS)
def test_recipe_values(model, method):
  cfg = C.load(str(paper_path(model, method)))
  expected = {**COMMON, **METHOD[method]}
  if method == "kl-cov":
    expected["loss.ratio"] = KL_COV_RATIO[model]
  for key, want in expected.items():
    got = get(cfg, key)
    if isinstance(want, float):
      assert got == pytest.approx(want, rel=1e-12), key
    else:
      assert got == want, key
  assert cfg.name == f"qwen2.5-{model}-{method}"
  # mini-batch of 32 prompts
  assert cfg.rollout.prompts_per_step // cfg.train.mini_batches == 32
  # placeholders for local copies, clearly named
  assert cfg.model.path.rstrip("/").endswith(MODEL_DIR[model])
  assert "dapo-math-17k" in cfg.data.train_path.lower()
  assert cfg.data.eval_path and cfg.data.eval_path != cfg.data.train_path
  # bfloat16 compute over float32 master weights and Adam state (bfloat16 parameters
  # would round lr=1e-6 AdamW steps away), remat
  assert cfg.model.dtype == "bfloat16" and cfg.model.param_dtype == "float32" and cfg.model.remat
  # generation from a bfloat16 copy of the weights, slots refilled as rows end
  assert cfg.rollout.compute_dtype == "bfloat16" and cfg.rollout.engine == "continuous"
  # 10240-token rows attend in query chunks (whole attention: 47 GB of scores per 7B row)
  assert 0 < cfg.model.attention_chunk < 2048 + 8192


@pytest.mark.parametrize("model", MODELS)
def test_methods_differ_only_in_loss(model):
  cfgs = {k: C.load(str(paper_path(model, k))) for k in METHODS}
  rest = {k: {**c.to_dict(), "loss": None, "name": None} for k, c in cfgs.items()}
  base = rest["grpo"]
  for k in METHODS:
    assert rest[k] == base, k
  losses = [dataclasses.astuple(c.loss) for c in cfgs.values()]
  assert len(set(losses)) == len(METHODS)


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("method", METHODS)
def test_meshes_tpu_and_gpu(model, method):
  path = paper_path(model, method)
  tpu = C.load(str(path))
  assert mesh_devices(tpu) == TPU_DEVICES[model]
  assert tpu.mesh.fsdp == TPU_DEVICES[model]  # FSDP over the whole slice
  assert rows_per_device_per_micro_batch(tpu) == 1
  gpu = C.load(str(path), gpu_overrides(path))
  assert mesh_devices(gpu) == GPU_DEVICES[model]
  assert rows_per_device_per_micro_batch(gpu) == GPU_ROWS[model]
  # The override touches the mesh, the accumulation and how many prompts and rows
  # are generated at once only: same gradient, same rollout distribution.
  def rest(cfg):
    d = cfg.to_dict()
    return {**d, "mesh": None, "train": None,
            "rollout": {**d["rollout"], "prompts_per_generate": None, "slots": None}}
  assert rest(gpu) == rest(tpu)
  assert dataclasses.replace(gpu.train, micro_batches=tpu.train.micro_batches) == tpu.train
  # The TPU slice generates a whole step's rows in one call; the GPUs in chunks
  # that split evenly over the batch devices (no padded prompts). Either way the
  # continuous engine's slots are a quarter of a call's rows (each slot is
  # refilled), split evenly over the batch devices.
  assert tpu.rollout.prompts_per_generate == 0
  chunk = gpu.rollout.prompts_per_generate
  assert 0 < chunk < gpu.rollout.prompts_per_step and chunk % (gpu.mesh.data * gpu.mesh.fsdp) == 0
  for cfg, prompts in ((tpu, tpu.rollout.prompts_per_step), (gpu, chunk)):
    rows = prompts * cfg.rollout.samples_per_prompt
    assert cfg.rollout.slots * 4 == rows
    assert cfg.rollout.slots % (cfg.mesh.data * cfg.mesh.fsdp) == 0
