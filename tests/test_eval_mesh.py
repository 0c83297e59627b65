"""`jaxent eval` on a device mesh: the same results as one device, loading into the mesh's layout.

The reference is the single-device evaluation of the same tiny random Qwen2
(a Hugging Face directory with the one-character tokenizer of
tests/test_eval.py, 4 query / 2 KV heads so that tensor=2 splits both): on
the 8-device CPU mesh, greedy and sampled (k > 1, same seed) responses must
be identical token for token, since the sampler's draws do not depend on the
layout (tests/test_sampler.py). Loading must give the params exactly the
layout ``models.param_shardings`` asks for; a run directory restores onto its
own mesh and equals the unsharded restore; two processes of 4 devices give
the one-process report.
"""
import json
import os
import re
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxent import cli, models, sharding
from jaxent import config as C
from jaxent import eval as E
from jaxent import train as T
from jaxent.train._checkpoint import Checkpointer
from jaxent.train._step import init_state, make_optimizer
from tests._tiny import loop_config, save_char_model
from tests.test_eval import EOS, WORDS, _read_jsonl, _write

# 16 tokens, so tensor=2 also splits the vocabulary (untied head).
VOCAB = WORDS + ["/"]
PROBLEMS = [("3+4", "7"), ("1+1", "2"), ("5*4-11", "9"), ("2*3", "6"), ("9-7", "2")]
SAMPLED = {"k": 4, "max_new_tokens": 3}      # aime24 preset: T = 0.6, mean@4
GREEDY = {"max_new_tokens": 3}               # math500 preset: greedy
# One device: 5 prompts x 4 samples in one call. A mesh's default batch (64 rows per data x fsdp
# shard) also takes the 5 prompts in one call, which the sampler pads to 8 prompts (a multiple of
# data x fsdp): the same keys, so the same draws.
ROWS = 20
# Greedy on an all-data mesh, sampled on one that splits rows, parameters and heads (each a
# compile of its own; the run directory below reuses the sampled programs).
CASES = [((8, 1, 1), "greedy"), ((2, 2, 2), "sampled")]
VOLATILE = {"time_s", "mesh", "processes", "model", "batch_size"}  # checked apart


@pytest.fixture(scope="module")
def hf16(tmp_path_factory):
  return save_char_model(tmp_path_factory.mktemp("hf16") / "tiny", VOCAB, eos_id=EOS, seed=3,
                         num_heads=4, num_kv_heads=2, head_dim=8, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def benches(tmp_path_factory):
  d = tmp_path_factory.mktemp("mbench")
  aime = _write(d / "aime24.jsonl", [{"problem": p, "answer": a} for p, a in PROBLEMS])
  m500 = _write(d / "math500.jsonl", [{"problem": p, "answer": a} for p, a in PROBLEMS])
  return (E.resolve_benchmark(aime, SAMPLED), E.resolve_benchmark(m500, GREEDY))


@pytest.fixture(scope="module")
def reference(hf16, benches):
  """One device: the reports and samples every mesh must reproduce, by benchmark."""
  model, tok, _ = T.load_model_or_run(hf16)
  assert sharding.mesh_of(model.params) is None
  out = {}
  for name, b in zip(("sampled", "greedy"), benches):
    rep, smp = E.evaluate_benchmark(model, tok, b, batch_size=ROWS, seed=5, return_samples=True)
    assert len({s["response"] for s in smp}) > 1  # not all the same: a real comparison
    assert rep["mesh"] == {"data": 1, "fsdp": 1, "tensor": 1} and rep["batch_size"] == ROWS
    out[name] = rep, smp
  assert out["sampled"][0]["k"] == 4 and out["greedy"][0]["k"] == 1
  return out


def _same(got, want):
  (rg, sg), (rw, sw) = got, want
  assert {k: v for k, v in rg.items() if k not in VOLATILE} == \
      {k: v for k, v in rw.items() if k not in VOLATILE}
  assert sg == sw  # every response, reward, length, finished flag


def _assert_layout(params, mesh, model_config):
  want = jax.tree.leaves(models.param_shardings(model_config, mesh))
  got = jax.tree.leaves(params)
  assert len(got) == len(want)
  for x, sh in zip(got, want):
    assert x.sharding == sh
  # Params are split when fsdp or tensor > 1 (over data alone they are replicated).
  split = any(not x.sharding.is_fully_replicated for x in got)
  assert split == (mesh.shape["fsdp"] * mesh.shape["tensor"] > 1)


@pytest.mark.parametrize("shape,which", CASES, ids=lambda c: "x".join(map(str, c))
                         if isinstance(c, tuple) else c)
def test_mesh_evaluation_equals_one_device(hf16, benches, reference, shape, which):
  mesh, note = T.eval_mesh(hf16, shape)
  assert tuple(mesh.shape.values()) == shape and note is None
  model, tok, _ = T.load_model_or_run(hf16, mesh=mesh)
  _assert_layout(model.params, mesh, model.config)
  ref_model, _, _ = T.load_model_or_run(hf16)
  jax.tree.map(np.testing.assert_array_equal, model.params, ref_model.params)
  # The mesh is found from the params' layout; the default batch is 64 rows per row shard.
  bench = benches[0] if which == "sampled" else benches[1]
  rep, smp = E.evaluate_benchmark(model, tok, bench, seed=5, return_samples=True)
  assert rep["mesh"] == dict(zip(("data", "fsdp", "tensor"), shape))
  assert rep["batch_size"] == 64 * shape[0] * shape[1]
  _same((rep, smp), reference[which])


def test_cli_mesh_equals_one_device(hf16, benches, reference, tmp_path, capsys):
  out, smp = str(tmp_path / "r.json"), str(tmp_path / "s.jsonl")
  assert cli.main(["eval", hf16, "--mesh", "data=2,fsdp=2,tensor=2", "--data", benches[0].path,
                   "--k", "4", "--max-new-tokens", "3", "--seed", "5", "--out", out,
                   "--samples-out", smp]) == 0
  assert "generating on data=2 x fsdp=2 x tensor=2 = 8 devices" in capsys.readouterr().err
  rep = json.load(open(out))[0]
  assert rep["model"] == hf16 and rep["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}
  _same((rep, _read_jsonl(smp)), reference["sampled"])


# ----------------------------------------------------------------------------- a run directory
@pytest.fixture(scope="module")
def run_dir(hf16, tmp_path_factory):
  """A run of the tiny model trained on mesh (2, 2, 2); its checkpoint holds other weights."""
  raw = loop_config(mesh={"data": 2, "fsdp": 2, "tensor": 2})
  raw["model"] = {"path": hf16}
  cfg = C.from_dict(raw)
  run = tmp_path_factory.mktemp("run")
  (run / "config.yaml").write_text(cfg.to_yaml())
  base = models.from_pretrained(hf16)
  trained = jax.tree.map(lambda x: x * 1.25 + 0.01, base.params)
  tr = cfg.train
  tx = make_optimizer(cfg.optim, tr.steps * tr.ppo_epochs * tr.mini_batches)
  ck = Checkpointer(str(run / "checkpoints"))
  ck.save(2, init_state(trained, tx, jax.random.PRNGKey(0)), {"rl_step": 2, "data": {}})
  ck.close()
  return str(run), trained


def test_run_restores_onto_its_own_mesh(hf16, run_dir, benches):
  path, trained = run_dir
  mesh, note = T.eval_mesh(path)                 # no --mesh: the mesh the run trained on
  assert tuple(mesh.shape.values()) == (2, 2, 2) and note is None
  cfg, model, tok, step = T.load_run(path, mesh=mesh)
  assert step == 2 and cfg.model.path == hf16
  _assert_layout(model.params, mesh, model.config)
  _, flat, _, _ = T.load_run(path)               # unsharded: this process's first device
  for x in jax.tree.leaves(flat.params):
    assert x.sharding == jax.sharding.SingleDeviceSharding(jax.devices()[0])
  jax.tree.map(np.testing.assert_array_equal, model.params, flat.params)
  jax.tree.map(np.testing.assert_array_equal, model.params, trained)
  # The checkpoint's weights sampled on the run's mesh equal one device's draws.
  got = E.evaluate_benchmark(model, tok, benches[0], seed=5, return_samples=True)
  want = E.evaluate_benchmark(flat, tok, benches[0], seed=5, batch_size=ROWS, return_samples=True)
  assert got[0]["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2} and got[0]["batch_size"] == 256
  _same(got, want)


def test_run_mesh_that_does_not_fit_falls_back_to_one_device(hf16, tmp_path):
  raw = loop_config(mesh={"data": 3, "fsdp": 1, "tensor": 1})
  raw["model"] = {"path": hf16}
  (tmp_path / "config.yaml").write_text(C.from_dict(raw).to_yaml())
  mesh, note = T.eval_mesh(str(tmp_path))
  assert mesh is None
  assert "does not fit the 8 devices" in note and "data=3" in note and "--mesh" in note
  mesh, note = T.eval_mesh(str(tmp_path), (-1, 1, 2))   # an explicit mesh wins
  assert tuple(mesh.shape.values()) == (4, 1, 2) and note is None
  mesh, note = T.eval_mesh(str(tmp_path), (2, 1, 1))    # a divisor of the devices: the first ones
  assert mesh.size == 2 and "first 2 of 8" in note


# ----------------------------------------------------------------------------- bad --mesh
@pytest.mark.parametrize("value,match", [
    ("data=3", r"--mesh: data=3 x fsdp=1 x tensor=1 = 3 devices, but 8 are available "
               r"\(3 does not divide 8\)"),
    ("fsdp=16", r"fsdp=16 x tensor=1 = 16 devices, but 8 are available"),
    ("data=-1,tensor=3", r"the fixed axes use 3 devices, which does not divide the 8"),
    ("tensor=4", r"--mesh: tensor=4 does not divide the model's 2 key/value heads"),
    ("dat=2", r"--mesh 'dat=2': unknown axis 'dat' \(axes: data, fsdp, tensor\)"),
    ("data=2,data=4", r"axis data given twice"),
    ("fsdp=0", r"fsdp=0: a size must be >= 1"),
    ("tensor=two", r"tensor='two': a size must be an integer"),
    ("data=-1,fsdp=-1", r"at most one axis may be -1"),
    ("8", r"'8' is not AXIS=SIZE"),
])
def test_cli_bad_mesh_exit_2(hf16, benches, capsys, value, match):
  assert cli.main(["eval", hf16, "--data", benches[1].path, "--mesh", value]) == 2
  err = capsys.readouterr().err
  assert err.startswith("jaxent: error:") and len(err.strip().splitlines()) == 1, err
  assert re.search(match, err), err


# ----------------------------------------------------------------------------- processes
def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_evaluate_like_one(hf16, benches, reference, tmp_path):
  """Two processes of 4 CPU devices, one (8, 1, 1) mesh (rows split across the processes):
  process 0 writes the one-device report; process 1 generates its share, writes nothing and exits
  0."""
  env = {k: v for k, v in os.environ.items() if not k.startswith(("JAXENT_", "SLURM_"))}
  env.update(XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
  port = _free_port()
  outs = [str(tmp_path / f"r{i}.json") for i in range(2)]
  smps = [str(tmp_path / f"s{i}.jsonl") for i in range(2)]
  procs = [subprocess.Popen(
      [sys.executable, "-m", "jaxent.cli", "eval", hf16, "--mesh", "data=8", "--data",
       benches[0].path, "--k", "4", "--max-new-tokens", "3", "--seed", "5", "--out", outs[i],
       "--samples-out", smps[i], "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
       "--process-id", str(i), "--init-timeout", "120"],
      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  res = [p.communicate(timeout=300) for p in procs]
  for i, (p, (out, err)) in enumerate(zip(procs, res)):
    assert p.returncode == 0, f"process {i}:\n{err[-3000:]}"
  assert "mean@k" in res[0][0] and "mean@k" not in res[1][0]
  assert not os.path.exists(outs[1]) and not os.path.exists(smps[1])
  rep = json.load(open(outs[0]))[0]
  assert rep["processes"] == 2 and rep["mesh"] == {"data": 8, "fsdp": 1, "tensor": 1}
  _same((rep, _read_jsonl(smps[0])), reference["sampled"])
