"""The RL loop end to end on the generated task: run directory, metrics, exact resume, CLI."""
import json
import os
import zlib

import jax
import numpy as np
import pytest
import yaml

from jaxent import cli, rewards
from jaxent import config as C
from jaxent import train as T
from jaxent.train import _build, _loop
from tests._tiny import TWO_HEAD_ARCH

BASE = {
    "name": "tiny",
    "model": {"arch": TWO_HEAD_ARCH},
    "data": {"task": "arithmetic", "num_operands": 2, "num_digits": 2, "num_eval": 16},
    "rollout": {"prompts_per_step": 4, "samples_per_prompt": 4, "max_new_tokens": 4,
                "reward": "arithmetic_exact"},
    # the tiny policy earns no reward, so an entropy bonus gives the update a real gradient
    "loss": {"name": "kl_cov", "ratio": 0.1, "entropy_coef": 0.01},
    "optim": {"lr": 1e-3},
    "train": {"steps": 4, "mini_batches": 2, "micro_batches": 2, "eval_every": 2, "ckpt_every": 2,
              "progress": False},
}
KEYS = {"step", "entropy", "reward_mean", "accuracy", "selected_frac", "clipfrac", "approx_kl",
        "grad_norm", "response_len_mean", "tokens_per_s", "step_time_s", "cov", "cov_p99", "cov_frac_pos",
        "data_valid", "reward_reward_failures"}


def _run(tmp, name, overrides=(), resume=False):
  cfg = C.from_dict(BASE, list(overrides))
  run_dir = os.path.join(tmp, name)
  comps = _build.build_components(cfg, run_dir)
  return _loop.train(cfg, run_dir, comps, resume=resume), run_dir


def _strip(rows):
  timing = ("step_time_s", "sample_time_s", "tokens_per_s")
  return [{k: v for k, v in r.items() if k not in timing} for r in rows]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
  tmp = str(tmp_path_factory.mktemp("loop"))
  res, run_dir = _run(tmp, "full")
  return tmp, res, run_dir


def test_run_directory_layout_and_metrics(full_run):
  _, res, run_dir = full_run
  assert set(os.listdir(run_dir)) >= {"checkpoints", "config.yaml", "data", "metrics.jsonl", "tb",
                                      "history.jsonl", "run.lock"}
  rows = [json.loads(l) for l in open(os.path.join(run_dir, "metrics.jsonl"))]
  assert [r["step"] for r in rows] == [1, 2, 3, 4]
  missing = KEYS - set(rows[0])
  assert not missing, missing
  assert "eval_accuracy" in rows[1] and "eval_accuracy" in rows[3]
  for r in rows:
    assert 0 < r["entropy"] < np.log(15) + 1e-3           # full-vocabulary entropy in nats
    assert 0 < r["selected_frac"] <= 0.1 + 1e-6           # KL-Cov selects ratio of the tokens
    # The sampler and the trainer's old-policy forward score the same tokens with the same
    # parameters (no top-k/top-p): they differ only by float32 rounding.
    assert 0 <= r["rollout_logprob_diff"] <= r["rollout_logprob_diff_max"] < 1e-3
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(run_dir, "tb")))
  assert sorted(os.listdir(os.path.join(run_dir, "checkpoints"))) == ["2", "4"]
  saved = yaml.safe_load(open(os.path.join(run_dir, "config.yaml")))
  assert saved["loss"]["name"] == "kl_cov" and saved["train"]["steps"] == 4
  assert int(res.state.step) == 4 * 2                     # steps x mini-batches updates


def test_resume_is_exact(full_run):
  """Stop after step 2, resume to step 4: same metrics and bitwise-equal parameters."""
  tmp, res, _ = full_run
  _run(tmp, "split", ["train.steps=2"])
  res2, run_dir = _run(tmp, "split", [], resume=True)
  rows = [json.loads(l) for l in open(os.path.join(run_dir, "metrics.jsonl"))]
  full_rows = [json.loads(l) for l in open(os.path.join(tmp, "full", "metrics.jsonl"))]
  assert _strip(rows) == _strip(full_rows)
  assert all(r["grad_norm"] > 0 for r in rows)            # the parameters really move
  for a, b in zip(jax.tree.leaves(res.state.params), jax.tree.leaves(res2.state.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _rows(run_dir):
  with open(os.path.join(run_dir, "metrics.jsonl")) as f:
    return [json.loads(l) for l in f]


def _assert_same_params(a, b):
  for x, y in zip(jax.tree.leaves(a.state.params), jax.tree.leaves(b.state.params)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_chunk_of_all_prompts_is_the_unchunked_run(full_run):
  """rollout.prompts_per_generate = prompts_per_step: the same run as 0, bitwise."""
  tmp, res, full_dir = full_run
  res2, run_dir = _run(tmp, "chunk-all", ["rollout.prompts_per_generate=4"])
  assert _strip(_rows(run_dir)) == _strip(_rows(full_dir))
  _assert_same_params(res, res2)


def test_chunked_rollouts_train_and_resume_exactly(full_run):
  """Chunks of 3 prompts (3 + a ragged 1): the run trains, and stopping after step 2 then
  resuming gives the same metrics and bitwise-equal parameters."""
  tmp, res, full_dir = full_run
  chunked = ["rollout.prompts_per_generate=3"]
  res_c, dir_c = _run(tmp, "chunked", chunked)
  _run(tmp, "chunked-split", chunked + ["train.steps=2"])
  res_r, dir_r = _run(tmp, "chunked-split", chunked, resume=True)
  rows = _rows(dir_c)
  assert [r["step"] for r in rows] == [1, 2, 3, 4]
  assert all(r["grad_norm"] > 0 for r in rows) and "eval_accuracy" in rows[3]
  assert _strip(_rows(dir_r)) == _strip(rows)
  _assert_same_params(res_c, res_r)
  # Each chunk draws with the step key and its rows' global ids (row_offset): the
  # unchunked run's samples.
  assert [r["response_len_mean"] for r in rows] == [r["response_len_mean"] for r in _rows(full_dir)]


def test_new_families_with_loss_state_log_and_resume_exactly(tmp_path):
  """GSPO with the top-entropy mask, an adaptive entropy coefficient and rollout correction:
  the run logs each, and stopping after step 2 then resuming is exact, coefficient included."""
  tmp = str(tmp_path)
  over = ["loss.name=gspo", "loss.top_entropy_quantile=0.5", "loss.adaptive_entropy.target=5.0",
          "loss.adaptive_entropy.delta=0.02", "rollout.correction.threshold=2.0",
          "rollout.correction.rejection=token_k3:10.0", "train.eval_every=0"]
  res, run_dir = _run(tmp, "fam", over)
  rows = _rows(run_dir)
  for key in ("entropy_coef", "entropy_mask_kept_frac", "rc_weight_mean", "rc_weight_max", "rc_masked_frac"):
    assert all(key in r for r in rows), key
  assert all(0.4 <= r["entropy_mask_kept_frac"] <= 0.75 for r in rows)
  # entropy < target: the coefficient rises by delta per update (2 a step) from 0.01,
  # and acts from the second update on (the first applies none)
  np.testing.assert_allclose(np.asarray(res.state.loss_state.coef), 0.01 + 8 * 0.02, rtol=1e-6)
  assert rows[0]["entropy_coef"] < rows[-1]["entropy_coef"]
  _run(tmp, "fam-split", over + ["train.steps=2"])
  res2, dir2 = _run(tmp, "fam-split", over, resume=True)
  assert _strip(_rows(dir2)) == _strip(rows)
  _assert_same_params(res, res2)
  for a, b in zip(jax.tree.leaves(res.state.loss_state), jax.tree.leaves(res2.state.loss_state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _coin_reward(response: str, answer: str) -> float:
  """1 for a quarter of the responses, by a hash of the text: with 4 samples a group has
  unequal rewards about 2/3 of the time, so DAPO's refill has work to do."""
  return float(zlib.crc32(response.encode()) % 4 == 0)


rewards.register_reward("test_coin", _coin_reward, isolated=False)


def test_dapo_refill_trains_on_unequal_groups_and_resumes_exactly(tmp_path):
  """rollout.max_gen_batches > 1: each step draws prompt batches until prompts_per_step
  groups have unequal rewards (or the limit); stopping and resuming is exact."""
  tmp = str(tmp_path)
  dapo = ["rollout.reward=test_coin", "rollout.filter_groups=true", "rollout.max_gen_batches=3",
          "train.eval_every=0"]
  cfg = C.from_dict(BASE, dapo)
  run_dir = os.path.join(tmp, "dapo")
  comps = _build.build_components(cfg, run_dir)
  res = _loop.train(cfg, run_dir, comps)
  rows = _rows(run_dir)
  gens = [r["gen_batches"] for r in rows]
  assert all(1 <= g <= 3 for g in gens) and max(gens) > 1, gens
  # Equal groups are trained on (masked) only when even 3 batches held fewer than 4 unequal ones.
  assert all(r["filtered_groups"] == 0 or r["gen_batches"] == 3 for r in rows), rows
  # Each generation batch took one batch of prompts from the data stream.
  assert comps.prompts.get_state()["step"] == sum(gens)
  _run(tmp, "dapo-split", dapo + ["train.steps=2"])
  res2, dir2 = _run(tmp, "dapo-split", dapo, resume=True)
  assert _strip(_rows(dir2)) == _strip(rows)
  _assert_same_params(res, res2)
  # Without refills the same settings draw one batch a step and mask the equal groups.
  _, one_dir = _run(tmp, "dapo-one", dapo[:2])
  assert all(r["gen_batches"] == 1 for r in _rows(one_dir))
  assert sum(r["filtered_groups"] for r in _rows(one_dir)) >= sum(r["filtered_groups"] for r in rows)


def test_export_and_eval_from_the_run(full_run, tmp_path):
  _, res, run_dir = full_run
  out = str(tmp_path / "hf")
  assert cli.main(["export", run_dir, out]) == 0
  assert os.path.isfile(os.path.join(out, "model.safetensors"))
  cfg, model, _, step = T.load_run(run_dir)
  assert step == 4
  for a, b in zip(jax.tree.leaves(res.state.params), jax.tree.leaves(model.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  bench = os.path.join(run_dir, "data", "heldout.jsonl")
  outj = str(tmp_path / "eval.json")
  assert cli.main(["eval", "--model", run_dir, "--data", bench, "--reward", "arithmetic_exact",
                   "--max-new-tokens", "4", "--k", "2", "--temperature", "1.0", "--out", outj]) == 0
  r = json.load(open(outj))[0]
  assert r["prompts"] == 16 and 0 <= r["mean@2"] <= r["pass@2"] <= 1


def test_bfloat16_compute_over_float32_master_weights(tmp_path):
  # model.dtype bfloat16 with model.param_dtype float32: the update, the Adam state and the
  # checkpoint stay float32 (a 1e-6 step is not rounded away), the KV cache and activations bf16.
  over = ["model.dtype=bfloat16", "model.param_dtype=float32", "train.steps=2",
          "train.eval_every=0", "train.ckpt_every=0"]
  cfg = C.from_dict(BASE, over)
  comps = _build.build_components(cfg, str(tmp_path / "run"))
  assert comps.model_config.dtype == "bfloat16" and comps.model_config.param_dtype == "float32"
  assert {x.dtype for x in jax.tree.leaves(comps.params)} == {np.dtype("float32")}
  before = jax.tree.map(np.asarray, comps.params)
  res = _loop.train(cfg, str(tmp_path / "run"), comps)
  assert len(res.history) == 2 and all(np.isfinite(r["grad_norm"]) for r in res.history)
  _, model, _, _ = T.load_run(str(tmp_path / "run"))
  after = jax.tree.leaves(model.params)
  assert {x.dtype for x in after} == {np.dtype("float32")}
  moved = [np.abs(a - b).max() for a, b in zip(after, jax.tree.leaves(before))]
  assert max(moved) > 0                      # it trained, in float32
  # the default keeps one dtype for both
  assert C.from_dict(BASE, ["model.dtype=bfloat16"]).model.storage_dtype == "bfloat16"


def test_release_params_frees_the_loaded_parameters(tmp_path):
  import gc
  import weakref
  cfg = C.from_dict(BASE, ["train.steps=1", "train.eval_every=0", "train.ckpt_every=0"])
  comps = _build.build_components(cfg, str(tmp_path / "run"))
  refs = [weakref.ref(x) for x in jax.tree.leaves(comps.params)]
  res = _loop.train(cfg, str(tmp_path / "run"), comps, release_params=True)
  gc.collect()
  assert comps.params is None and len(res.history) == 1
  assert all(r() is None for r in refs)      # no copy of the loaded weights outlives the start


def test_cli_train_bad_input_exit_2(tmp_path, capsys):
  cfg = tmp_path / "c.yaml"
  cfg.write_text(yaml.safe_dump(BASE))
  run_dir = tmp_path / "never"
  assert cli.main(["train", str(cfg), "--set", "loss.rato=0.1", "--run-dir", str(run_dir)]) == 2
  err = capsys.readouterr().err
  assert "loss.rato: unknown key; did you mean 'loss.ratio'?" in err and len(err.strip().splitlines()) == 1
  assert not run_dir.exists()                              # nothing written
  assert cli.main(["train", str(tmp_path / "missing.yaml")]) == 2
  bad_data = dict(BASE, model={"path": str(tmp_path)}, data={"task": "jsonl", "train_path": "x.jsonl"})
  cfg.write_text(yaml.safe_dump(bad_data))
  assert cli.main(["train", str(cfg), "--run-dir", str(run_dir)]) == 2
  assert "model.path" in capsys.readouterr().err
