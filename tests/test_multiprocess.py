"""Multi-process training on one machine: two CPU processes joined over loopback.

``jaxent train`` runs in two processes of 4 CPU devices each (one 8-device
(2,2,2) mesh, gloo collectives), coordinated on 127.0.0.1. Each reads half of
the prompts; process 0 alone writes the run directory's files; the checkpoint
both wrote restores in a single process. The logged metrics equal a
one-process run on the same global mesh. A process whose coordinator never
comes up, or dies, exits non-zero with a message instead of hanging.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import yaml

from jaxent import cli
from jaxent import config as C
from jaxent.apps import _distributed
from jaxent.errors import EXIT_PREEMPTED
from jaxent.train import _build, _loop
from tests._tiny import loop_config

# The run of tests/test_sharded_train.py (shared compiled programs in one session).
BASE = loop_config(name="multi", train={"steps": 2, "ckpt_every": 1},
                   mesh={"data": 2, "fsdp": 2, "tensor": 2})
TIMING = {"step_time_s", "sample_time_s", "tokens_per_s"}


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(devices: int) -> dict:
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONUNBUFFERED"] = "1"
  for k in list(env):
    if k.startswith(("JAXENT_", "SLURM_")):
      del env[k]
  return env


def _launch(args, devices=4, **kw):
  return subprocess.Popen([sys.executable, "-m", "jaxent.cli", *args], env=_env(devices),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _launch_pair(cfg_path, run_dir):
  """``jaxent train`` as processes 0 and 1 of one job, coordinated over loopback."""
  port = _free_port()
  return [_launch(["train", str(cfg_path), "--run-dir", run_dir, "--coordinator", f"127.0.0.1:{port}",
                   "--num-processes", "2", "--process-id", str(i), "--init-timeout", "120"])
          for i in range(2)]


def _rows(run_dir):
  with open(os.path.join(run_dir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _assert_rows_close(got, want):
  assert [r["step"] for r in got] == [r["step"] for r in want]
  for a, b in zip(got, want):
    assert set(a) == set(b)
    for k in set(a) - TIMING:
      if b[k] is None:
        assert a[k] is None, k
      else:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-4, atol=1e-6, err_msg=f"step {b['step']} {k}")


def test_two_processes_train_like_one(tmp_path):
  cfg_path = tmp_path / "multi.yaml"
  cfg_path.write_text(yaml.safe_dump(BASE))
  run_dir = str(tmp_path / "run")
  procs = _launch_pair(cfg_path, run_dir)
  # Meanwhile, in this process: the same config on the same 8-device mesh, one step longer.
  ref_cfg = C.from_dict(BASE, ["train.steps=3"])
  ref_dir = str(tmp_path / "ref")
  ref = _loop.train(ref_cfg, ref_dir, _build.build_components(ref_cfg, ref_dir))
  outs = [p.communicate(timeout=400) for p in procs]
  for i, (p, (out, err)) in enumerate(zip(procs, outs)):
    assert p.returncode == 0, f"process {i}:\n{err[-4000:]}"
  assert "2 steps" in outs[0][0] and "2 steps" in outs[1][0]

  # Process 0 alone wrote the files; both processes wrote the checkpoints.
  rows = _rows(run_dir)
  assert [r["step"] for r in rows] == [1, 2]
  assert len(os.listdir(os.path.join(run_dir, "tb"))) == 1
  assert sorted(os.listdir(os.path.join(run_dir, "checkpoints"))) == ["1", "2"]
  # Half of the prompts each, assembled into the one-process batch: the same metrics.
  _assert_rows_close(rows, ref.history[:2])

  # The two-process checkpoint resumes in one process and continues like the reference.
  cfg3 = C.from_dict(BASE, ["train.steps=3"])
  res = _loop.train(cfg3, run_dir, _build.build_components(cfg3, run_dir), resume=True)
  _assert_rows_close(_rows(run_dir), ref.history)
  for a, b in zip(jax.tree.leaves(res.state.params), jax.tree.leaves(ref.state.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_sigterm_to_one_process_stops_both_at_the_same_saved_step(tmp_path):
  """Preemption across hosts: SIGTERM reaches only process 1; after the step under way both
  processes agree (one gather), save the same checkpoint and exit 75."""
  cfg = loop_config(name="multi", train={"steps": 1000, "ckpt_every": 0, "preempt_grace_s": 120},
                    mesh={"data": 2, "fsdp": 2, "tensor": 2})
  cfg_path = tmp_path / "pre.yaml"
  cfg_path.write_text(yaml.safe_dump(cfg))
  run_dir = str(tmp_path / "run")
  procs = _launch_pair(cfg_path, run_dir)
  try:
    metrics = os.path.join(run_dir, "metrics.jsonl")
    deadline = time.monotonic() + 300
    while not (os.path.exists(metrics) and _rows(run_dir)):    # process 0 logged a step
      assert time.monotonic() < deadline and all(p.poll() is None for p in procs), \
          [p.communicate(timeout=30)[1][-3000:] for p in procs if p.poll() is not None]
      time.sleep(0.2)
    procs[1].send_signal(signal.SIGTERM)
    outs = [p.communicate(timeout=200) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  for i, (p, (_, err)) in enumerate(zip(procs, outs)):
    assert p.returncode == EXIT_PREEMPTED, f"process {i}:\n{err[-3000:]}"
  saved = sorted(int(n) for n in os.listdir(os.path.join(run_dir, "checkpoints")) if n.isdigit())
  assert len(saved) == 1 and saved[0] >= 1
  n = saved[0]
  assert [r["step"] for r in _rows(run_dir)] == list(range(1, n + 1))
  assert f"after step {n}: checkpoint {n} saved" in outs[0][1]   # process 0 never got a signal
  # the checkpoint both processes wrote restores in one process and continues
  cfg_next = C.from_dict(cfg, [f"train.steps={n + 1}"])
  res = _loop.train(cfg_next, run_dir, _build.build_components(cfg_next, run_dir), resume=True)
  assert int(res.state.step) == (n + 1) * cfg_next.train.mini_batches


def test_a_process_without_coordinator_exits_with_a_message(tmp_path):
  cfg_path = tmp_path / "c.yaml"
  cfg_path.write_text(yaml.safe_dump(BASE))
  port = _free_port()                                         # nobody listens there
  t0 = time.monotonic()
  p = _launch(["train", str(cfg_path), "--run-dir", str(tmp_path / "r"), "--coordinator",
               f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", "1", "--init-timeout", "3"])
  out, err = p.communicate(timeout=120)
  assert p.returncode == cli.EXIT_NO_COORDINATOR == 4
  assert (f"process 1 of 2 could not join the job through the coordinator 127.0.0.1:{port} "
          "(process 0) within 3 s") in err
  assert time.monotonic() - t0 < 60
  assert not (tmp_path / "r").exists()


_SURVIVOR = """
import os, sys, time
from jaxent.apps import initialize_distributed
info = initialize_distributed("127.0.0.1:{port}", 2, int(sys.argv[1]), timeout_s=60, heartbeat_timeout_s=5)
print("joined", info.process_index, info.process_count, flush=True)
if info.process_index == 0:
  time.sleep(1)
  os._exit(9)                  # the coordinator's process dies
time.sleep(120)
print("still running", flush=True)
"""


def test_a_process_that_loses_its_coordinator_exits(tmp_path):
  script = tmp_path / "s.py"
  script.write_text(_SURVIVOR.format(port=_free_port()))
  procs = [subprocess.Popen([sys.executable, str(script), str(i)], env=_env(1), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(2)]
  t0 = time.monotonic()
  out, err = procs[1].communicate(timeout=100)
  procs[0].communicate(timeout=30)
  assert "joined 1 2" in out and "still running" not in out
  assert procs[1].returncode != 0
  assert "Terminating process because the JAX distributed service detected fatal errors" in err
  assert time.monotonic() - t0 < 60


# ----------------------------------------------------------------------------- settings
def test_cluster_detection_and_explicit_settings():
  assert _distributed.detect_cluster({}) is None
  assert _distributed.detect_cluster({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}) is None
  assert _distributed.detect_cluster({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}) == "slurm"
  assert _distributed.detect_cluster({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4",
                                      "JAXENT_COORDINATOR": "h:1"}) == "explicit"
  # one process: nothing to join, JAX untouched
  assert _distributed.initialize_distributed(env={}) == _distributed.DistributedInfo(None, 0, 1)
  assert _distributed.initialize_distributed("h:1", 1, 0, env={}).process_count == 1
  bad = [(("h:1", None, None), r"also give --num-processes / JAXENT_NUM_PROCESSES, --process-id"),
         (("h", 2, 0), r"--coordinator must be HOST:PORT"),
         (("h:1", 2, 2), r"--process-id 2 is not below --num-processes 2"),
         (("h:1", 0, 0), r"--num-processes must be >= 1, got 0")]
  for args, msg in bad:
    with pytest.raises(_distributed.DistributedError, match=msg):
      _distributed.initialize_distributed(*args, env={})
  with pytest.raises(_distributed.DistributedError, match=r"JAXENT_PROCESS_ID"):
    _distributed.initialize_distributed(env={"JAXENT_COORDINATOR": "h:1", "JAXENT_NUM_PROCESSES": "2"})


def test_cli_bad_multiprocess_flags_exit_2(tmp_path, capsys):
  cfg_path = tmp_path / "c.yaml"
  cfg_path.write_text(yaml.safe_dump(BASE))
  assert cli.main(["train", str(cfg_path), "--run-dir", str(tmp_path / "r"),
                   "--coordinator", "nohost", "--num-processes", "2", "--process-id", "0"]) == 2
  assert "--coordinator must be HOST:PORT" in capsys.readouterr().err
  assert not (tmp_path / "r").exists()
