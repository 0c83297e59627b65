"""bench/device_suite.sh: its CPU dry path runs every step and reports identical engine rows."""
import os
import re
import subprocess
import sys


def test_device_suite_dry_run_on_cpu():
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, PYTHON=sys.executable,
             PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
  env.pop("XLA_FLAGS", None)  # one CPU device, as on the accelerator machine
  out = subprocess.run(["bash", os.path.join(root, "bench", "device_suite.sh"), "--dry-run"],
                       capture_output=True, text=True, env=env, timeout=400)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  assert "tokens identical row by row: True" in out.stdout
  assert "=== rollout_engine: exit 0" in out.stdout and "=== losses: exit 0" in out.stdout
  # The MFU step: FLOPs, step time and TFLOP/s agree; no peak for a CPU, so MFU n/a.
  assert "=== train_mfu: exit 0" in out.stdout
  flops = float(re.search(r"model FLOPs per step ([0-9.e+]+)", out.stdout).group(1))
  step_ms = float(re.search(r"step ([0-9.]+) ms \(median", out.stdout).group(1))
  tflops = float(re.search(r"achieved ([0-9.e+-]+) TFLOP/s", out.stdout).group(1))
  assert flops > 0 and abs(tflops / (flops / (step_ms * 1e-3) / 1e12) - 1) < 5e-3  # printed digits
  assert "MFU n/a" in out.stdout


def test_device_suite_skips_steps_past_its_deadline():
  """No step outlives the suite's deadline: with 5 s for the suite, every step is
  skipped (under 10 s left), named, and the suite exits 1."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, PYTHON="true", SUITE_S="5")  # `true`: the device probe costs nothing
  out = subprocess.run(["bash", os.path.join(root, "bench", "device_suite.sh"), "--dry-run"],
                       capture_output=True, text=True, env=env, timeout=60)
  assert out.returncode == 1, out.stdout + out.stderr
  for name in ("rollout_engine", "train_mfu", "losses"):
    assert re.search(rf"=== {name}: skipped, -?\d+ s left of the suite's 5 s", out.stdout), out.stdout
  assert "exit 0" not in out.stdout
