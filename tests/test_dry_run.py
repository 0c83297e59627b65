"""``jaxent train CONFIG --dry-run``: abstract model and mesh, AOT lowering, memory per device.

The paper's 7B and 32B recipes are checked against their Hugging Face
config.json numbers (written here; no weights, no downloads): the parameter
count equals the closed-form count of a Qwen2 decoder, the 64/256-chip meshes
are lowered abstractly, the per-device state is 16 bytes per parameter over
the FSDP devices. A tiny config compiles for real on the 8 CPU devices and
XLA's argument size equals the sharded state plus the batch shard.
"""
import dataclasses
import json
import math
import os
import re
from pathlib import Path

import numpy as np
import pytest

from jaxent import cli
from jaxent import config as C
from jaxent.apps import _dryrun
from tests.test_configs import gpu_overrides

QWEN = {
    # Qwen2.5-7B and Qwen2.5-32B config.json (the published values).
    "7b": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
               num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False),
    "32b": dict(vocab_size=152064, hidden_size=5120, intermediate_size=27648, num_hidden_layers=64,
                num_attention_heads=40, num_key_value_heads=8, tie_word_embeddings=False),
}
RECIPES = {"7b": ("configs/paper/qwen2.5-7b-kl-cov.yaml", 64),
           "32b": ("configs/paper/qwen2.5-32b-clip-cov.yaml", 256)}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _hf_dir(tmp_path, size):
  d = tmp_path / f"qwen2.5-{size}"
  d.mkdir()
  cfg = dict(QWEN[size], architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_act="silu",
             max_position_embeddings=131072, rope_theta=1000000.0, rms_norm_eps=1e-6,
             use_sliding_window=False, sliding_window=131072, max_window_layers=28,
             bos_token_id=151643, eos_token_id=151643, torch_dtype="bfloat16")
  (d / "config.json").write_text(json.dumps(cfg))
  return str(d)


def _qwen2_params(c) -> int:
  """Closed form: embeddings + untied head + final norm + per layer: q/k/v with biases, o,
  SwiGLU, two norms."""
  v, d, f, n = c["vocab_size"], c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
  hd = d // c["num_attention_heads"]
  q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
  layer = d * q + q + 2 * (d * kv + kv) + q * d + 3 * d * f + 2 * d
  return v * d * (1 if c["tie_word_embeddings"] else 2) + n * layer + d


def _params_bytes_per_chip(size, chips) -> float:
  """float32 params split over the FSDP chips, except the biases and norm scales
  (their dims are heads/head_dim and act_embed: replicated)."""
  c = QWEN[size]
  d, layers = c["hidden_size"], c["num_hidden_layers"]
  kv = c["num_key_value_heads"] * d // c["num_attention_heads"]
  rep = layers * (d + 2 * kv + 2 * d) + d
  return 4 * ((_qwen2_params(c) - rep) / chips + rep)


@pytest.mark.parametrize("size", ["7b", "32b"])
def test_paper_recipe_dry_run(size, tmp_path, monkeypatch, capsys):
  recipe, chips = RECIPES[size]
  hf = _hf_dir(tmp_path, size)
  monkeypatch.chdir(tmp_path)
  before = sorted(os.listdir(tmp_path))
  assert cli.main(["train", os.path.join(ROOT, recipe), "--set", f"model.path={hf}", "--dry-run"]) == 0
  out = capsys.readouterr().out
  assert sorted(os.listdir(tmp_path)) == before                # nothing written (no runs/)
  n = _qwen2_params(QWEN[size])
  assert f"params    {n:,} " in out
  assert n == {"7b": 7_615_616_512, "32b": 32_763_876_352}[size]   # the model cards' 7.61B / 32.8B
  assert f"data=1 x fsdp={chips} x tensor=1" in out
  assert f"lowered for an abstract 1x{chips}x1 tpu mesh (not compiled)" in out
  per_chip = _params_bytes_per_chip(size, chips)
  est = {k: float(v) for k, v in re.findall(r"(params|optimizer|gradients) ([\d.e+-]+) GB", out)}
  np.testing.assert_allclose(est["params"] * 1e9, per_chip, rtol=1e-3)
  np.testing.assert_allclose(est["gradients"] * 1e9, per_chip, rtol=1e-3)
  np.testing.assert_allclose(est["optimizer"] * 1e9, 2 * per_chip, rtol=1e-3)
  assert "1 per device over data x fsdp" in out               # the recipes' one row per chip
  assert "float32 params, bfloat16 compute, remat, attention in query chunks of 512" in out
  # One 10240-token row per chip under remat, by hand: every layer's input, plus one
  # layer's q/k/v (twice: value + cotangent), 3 MLP and 4 residual-width intermediates,
  # all bfloat16 (2 bytes), and the float32 (4 bytes) scores, probabilities and their
  # cotangents for 512 queries x 10240 keys.
  c, t = QWEN[size], 10240
  d, f, h, kv = (c["hidden_size"], c["intermediate_size"], c["num_attention_heads"],
                 c["num_key_value_heads"])
  hd, layers = d // h, c["num_hidden_layers"]
  row = (2 * (layers * t * d + t * (2 * (h + 2 * kv) * hd + 3 * f + 4 * d))
         + 4 * 4 * h * 512 * t)
  act = float(re.search(r"activations ([\d.]+) GB", out).group(1))
  np.testing.assert_allclose(act * 1e9, row, rtol=1e-3)
  # TPU: a step's 256 prompts in one call, their 2048 rows through the 512 slots of the
  # continuous engine; bfloat16 K and V of 10240 entries per slot, slots over the chips.
  assert ("256 prompts x 8 samples per step in 1 sampler call of 256 prompts, continuous "
          "engine: 2048 rows through 512 slots") in out
  token = 2 * layers * kv * hd * 2
  cache = float(re.search(r"rollout kv cache ([\d.]+) GB", out).group(1))
  np.testing.assert_allclose(cache * 1e9, 512 / chips * t * token, rtol=1e-3)
  # While generating: the float32 state without gradients, the bfloat16 weight copy,
  # the slots' cache, the 256 prompts' prefill cache (2048 entries each) and the
  # output buffers (4 arrays of 4 bytes per row and response token).
  total = float(re.search(r"rollout total ([\d.]+) GB", out).group(1))
  np.testing.assert_allclose(total * 1e9, 3 * per_chip + per_chip / 2 + 512 / chips * t * token
                             + 256 / chips * 2048 * token + 2048 / chips * 8192 * 16, rtol=1e-3)


@pytest.mark.parametrize("size, gpus", [("7b", 8), ("32b", 32)])
def test_gpu_variants_generate_in_chunks_that_fit_an_h100(size, gpus, tmp_path):
  """The GPU command of each recipe's header: the KV cache is that of the continuous
  engine's slots for one chunk of prompts, and generation and the update each fit an
  80 GB H100."""
  path = Path(ROOT) / f"configs/paper/qwen2.5-{size}-grpo.yaml"
  cfg = C.load(str(path), gpu_overrides(path) + [f"model.path={_hf_dir(tmp_path, size)}"])
  lines = []
  rep = _dryrun.dry_run(cfg, topology=str(gpus), platform="cuda", log=lines.append)
  d, f, t = rep.mesh_shape
  assert d * f * t == gpus
  q = QWEN[size]
  head_dim = q["hidden_size"] // q["num_attention_heads"]

  def kv(rows, itemsize=2):  # K and V: rows of 2048 + 8192 entries, rows over data x fsdp
    return (rows / (d * f) * 10240 * 2 * q["num_hidden_layers"] * q["num_key_value_heads"] / t
            * head_dim * itemsize)
  chunk, slots = cfg.rollout.prompts_per_generate, cfg.rollout.slots
  assert rep.per_device["rollout_kv_cache"] == pytest.approx(kv(slots), rel=1e-9)
  assert any(f"in {256 // chunk} sampler calls of {chunk} prompts, continuous engine: "
             f"{chunk * 8} rows through {slots} slots" in l for l in lines), lines
  pd = rep.per_device
  prompts = kv(chunk) * 2048 / 10240                       # the chunk's prefill cache
  out = chunk * 8 / (d * f) * 8192 * 16                    # output buffers
  assert pd["rollout_total"] == pytest.approx(
      pd["params"] * 3.5 + kv(slots) + prompts + out, rel=1e-9)   # f32 state w/o grads + bf16 copy
  assert pd["rollout_total"] < 80e9 and pd["train_total"] < 80e9
  if size == "7b":
    # The static engine, unchunked, on the same mesh needs a whole rollout's cache:
    # 150 GB in bfloat16 (300 GB in float32).
    whole = _dryrun.dry_run(dataclasses.replace(cfg, rollout=dataclasses.replace(
        cfg.rollout, prompts_per_generate=0, engine="static")), topology=str(gpus),
        platform="cuda", log=lambda _: None)
    assert whole.per_device["rollout_kv_cache"] == pytest.approx(kv(2048), rel=1e-9)
    assert whole.per_device["rollout_kv_cache"] > 80e9
    # Generation in the model's dtype (no rollout.compute_dtype): no weight copy and
    # the KV cache in bfloat16 too; with float32 compute, twice the cache.
    same = _dryrun.dry_run(dataclasses.replace(cfg, rollout=dataclasses.replace(
        cfg.rollout, compute_dtype=None)), topology=str(gpus), platform="cuda",
        log=lambda _: None)
    assert same.per_device["rollout_total"] == pytest.approx(
        pd["rollout_total"] - pd["params"] / 2, rel=1e-9)
    f32 = _dryrun.dry_run(dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, dtype="float32"),
        rollout=dataclasses.replace(cfg.rollout, compute_dtype=None)), topology=str(gpus),
        platform="cuda", log=lambda _: None)
    assert f32.per_device["rollout_kv_cache"] == pytest.approx(kv(slots, 4), rel=1e-9)


def test_chunked_attention_lets_an_h100_hold_four_7b_rows(tmp_path):
  """Activations of the 7B update per GPU with 4 rows per micro-batch (the GPU command's
  micro_batches=8 on 8 GPUs): with whole attention the [28, 10240, 10240] float32 scores,
  probabilities and their cotangents alone are 47 GB a row; chunked, the update fits an
  80 GB H100."""
  path = Path(ROOT) / "configs/paper/qwen2.5-7b-grpo.yaml"
  cfg = C.load(str(path), gpu_overrides(path) + [f"model.path={_hf_dir(tmp_path, '7b')}"])
  mcfg = _dryrun.model_config(cfg)
  assert mcfg.attention_chunk == 512 and mcfg.remat
  assert cfg.train.micro_batches == 8 and cfg.mesh.fsdp == 8   # 2048 / 8 / 8 / 8 = 4 rows per GPU
  chunked = _dryrun._activation_bytes(mcfg, 4, 10240, 1)
  whole = _dryrun._activation_bytes(mcfg.replace(attention_chunk=0), 4, 10240, 1)
  assert whole - chunked == pytest.approx(4 * 4 * 28 * (10240 - 512) * 10240 * 4, rel=1e-12)
  state = 16 * 7_615_616_512 / 8                                 # params, grads, Adam mu and nu
  assert state + chunked < 80e9 < state + whole / 2           # whole: not even two rows fit


def test_tiny_config_compiles_on_the_cpu_mesh():
  arch = {"model_type": "qwen2", "hidden_size": 32, "num_layers": 1, "num_heads": 4, "num_kv_heads": 2,
          "head_dim": 8, "intermediate_size": 64, "tie_word_embeddings": True}
  cfg = C.from_dict({
      "model": {"arch": arch}, "data": {"task": "arithmetic", "max_prompt_len": 12},
      "rollout": {"prompts_per_step": 4, "samples_per_prompt": 4, "max_new_tokens": 4,
                  "reward": "arithmetic_exact"},
      "loss": {"name": "kl_cov"}, "train": {"mini_batches": 2},
      "mesh": {"data": 2, "fsdp": 2, "tensor": 2}})
  lines = []
  rep = _dryrun.dry_run(cfg, log=lines.append)
  assert rep.mode == "compiled" and rep.platform == "cpu" and rep.mesh_shape == (2, 2, 2)
  assert any("compiled for 8 local cpu devices" in l for l in lines)
  # XLA's per-device arguments: the state's shards + the batch's shard (8 rows / 4, 12 + 4 tokens).
  v, d, f, kv, hd, h = 15, 32, 64, 2, 8, 4
  sharded = {"emb": v * d / 2, "q": d * h * hd / 4, "kv": 2 * d * kv * hd / 4, "o": h * hd * d / 4,
             "mlp": 3 * d * f / 4, "qkv_b": (h + 2 * kv) * hd / 2}   # vocab 15: not split by tensor
  replicated = 3 * d                                                 # two norms + final norm
  params = 4 * (sum(sharded.values()) + replicated)
  # step, key; apply_if_finite's two int32 counters and a bool; Adam's and the schedule's counts
  scalars = 4 + 8 + (4 + 4 + 1) + (4 + 4)
  batch = 2 * (3 * 16 * 4 + 4 * 4 * 4)            # 2 rows per device x (3 int + 4 float arrays)
  # XLA does not count inputs the step never reads: the reference log-probs (no
  # reference KL; 2 x 4 floats) and apply_if_finite's last_finite flag.
  unread = 2 * 4 * 4 + 1
  assert rep.compiled["argument"] == 3 * params + scalars + batch - unread
  assert rep.num_params == v * d + (d * h * hd + h * hd + 2 * (d * kv * hd + kv * hd) + h * hd * d
                                    + 3 * d * f + 2 * d) + d


def test_bad_dry_runs_exit_2_and_write_nothing(tmp_path, monkeypatch, capsys):
  hf = _hf_dir(tmp_path, "7b")
  recipe = os.path.join(ROOT, RECIPES["7b"][0])
  monkeypatch.chdir(tmp_path)
  before = sorted(os.listdir(tmp_path))
  cases = [
      (["--set", "train.micro_batches=8"], "a micro-batch of 32 rows"),
      (["--set", "mesh.tensor=3", "--set", "mesh.fsdp=4"], "mesh.tensor: 3 does not divide the model's 28"),
      (["--set", "model.path=/nonexistent"], "model.path"),
      (["--set", "loss.rato=1"], "did you mean 'loss.ratio'"),
      (["--topology", "v5p:4x4x4"], "--topology v5p:4x4x4: cannot describe it here"),
  ]
  for extra, msg in cases:
    assert cli.main(["train", recipe, "--set", f"model.path={hf}", *extra, "--dry-run"]) == 2, extra
    err = capsys.readouterr().err
    assert msg in err and len(err.strip().splitlines()) == 1, err
  assert sorted(os.listdir(tmp_path)) == before


def test_topology_as_a_device_count(tmp_path, capsys):
  hf = _hf_dir(tmp_path, "7b")
  recipe = os.path.join(ROOT, RECIPES["7b"][0])
  # the GPU variant of the recipe, resolving fsdp=-1 for a 4-node job
  assert cli.main(["train", recipe, "--set", f"model.path={hf}", "--set", "mesh.fsdp=-1",
                   "--set", "train.micro_batches=8", "--topology", "32", "--platform", "cuda",
                   "--dry-run"]) == 0
  out = capsys.readouterr().out
  assert "data=1 x fsdp=32 x tensor=1" in out and "abstract 1x32x1 cuda mesh" in out
  assert math.isclose(float(re.search(r"params ([\d.]+) GB", out).group(1)) * 1e9,
                      _params_bytes_per_chip("7b", 32), rel_tol=1e-3)


@pytest.mark.parametrize("slots, chunk, want_slots, want_bp", [
    (64, 32, 64, 32),     # S rows of cache, the chunk's 32 prompts
    (60, 24, 64, 32),     # S rounded up to a multiple of the 8 row shards, 24 prompts padded to 32
    (0, 32, 64, 32),      # default S: a quarter of a call's 256 rows
    (0, 4, 8, 8),         # default S: a quarter of 32 rows
    (0, 1, 8, 8),         # default S: a quarter of 8 rows = 2, rounded up to the 8 row shards
])
def test_continuous_engine_holds_its_slots_not_its_rows(slots, chunk, want_slots, want_bp, tmp_path):
  """The continuous engine's memory while generating, by hand: the S slots' cache
  ``[L, S, P + R, K, H]`` (not one row per generated response), the prompts' prefill
  cache ``[L, Bp, P, K, H]`` kept for the refills, and the output buffers (tokens, mask,
  log-probs, policy log-probs: 4 bytes each per row and response token), beside the
  float32 train state and its bfloat16 copy."""
  path = Path(ROOT) / "configs/paper/qwen2.5-7b-grpo.yaml"
  cfg = C.load(str(path), [f"model.path={_hf_dir(tmp_path, '7b')}", "mesh.fsdp=8",
                           "train.micro_batches=8", f"rollout.prompts_per_generate={chunk}",
                           "rollout.engine=continuous", f"rollout.slots={slots}",
                           "rollout.compute_dtype=bfloat16"])
  lines = []
  rep = _dryrun.dry_run(cfg, topology="8", platform="cuda", log=lines.append)
  token = 2 * 28 * 4 * 128 * 2                   # bfloat16 K and V of one token, all 28 layers
  slot_cache = want_slots / 8 * (2048 + 8192) * token
  prompt_cache = want_bp / 8 * 2048 * token
  out = want_bp * 8 / 8 * 8192 * 16
  pd = rep.per_device
  assert pd["rollout_kv_cache"] == pytest.approx(slot_cache, rel=1e-12)
  copy = pd["params"] / 2                        # bfloat16 weights beside float32 master weights
  assert pd["rollout_total"] == pytest.approx(
      pd["params"] + pd["optimizer"] + copy + slot_cache + prompt_cache + out, rel=1e-12)
  assert any(f"continuous engine: {want_bp * 8} rows through {want_slots} slots, KV cache of "
             f"{want_slots} rows x 10240 entries ({want_slots // 8} rows per data x fsdp shard)"
             in l for l in lines), lines
  # The static engine on the same chunk keeps every row of the call.
  static = _dryrun.dry_run(dataclasses.replace(cfg, rollout=dataclasses.replace(
      cfg.rollout, engine="static")), topology="8", platform="cuda", log=lambda _: None)
  assert static.per_device["rollout_kv_cache"] == pytest.approx(
      _static_rows(chunk) / 8 * 10240 * token, rel=1e-12)


def _static_rows(chunk):
  """The static engine's rows of a chunked call: the chunk (its own batch bucket) x 8 samples,
  rounded up to the 8 row shards."""
  return -(-chunk // 8) * 8 * 8
