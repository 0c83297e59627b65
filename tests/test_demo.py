"""`jaxent demo --quick`: the embedded default end to end (smoke version)."""
import json
import os
import subprocess
import sys

import pytest


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("demo") / "demo")
  proc = subprocess.run([sys.executable, "-m", "jaxent.cli", "demo", "--quick", "--out", out],
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return out, proc.stdout


def test_quick_demo_writes_every_artifact(quick_demo):
  out, stdout = quick_demo
  summary = json.load(open(os.path.join(out, "summary.json")))
  assert set(summary["methods"]) == {"grpo", "clip_cov", "kl_cov"}
  for name, m in summary["methods"].items():
    for key in ("initial_entropy", "final_entropy", "final_accuracy", "law", "per_seed"):
      assert key in m, (name, key)
    assert 0 < m["initial_entropy"] < 3 and 0 <= m["final_accuracy"] <= 1
    run = m["per_seed"][0]["run_dir"]
    assert os.path.isfile(os.path.join(run, "metrics.jsonl"))
    assert os.listdir(os.path.join(run, "tb"))
    assert os.listdir(os.path.join(run, "checkpoints"))
    rows = [json.loads(l) for l in open(os.path.join(run, "metrics.jsonl"))]
    assert len(rows) == summary["settings"]["rl_steps"]
    if name == "kl_cov":                                    # KL-Cov always selects >= 1 token
      assert all(r["selected_frac"] > 0 for r in rows)
    if name == "grpo":
      assert all(r.get("selected_frac") is None for r in rows)
  assert "grpo_entropy_ratio" in summary["checks"]
  with open(os.path.join(out, "report.png"), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert "summary.json" in stdout


def test_configs_demo_yaml_is_the_embedded_default():
  from jaxent import config as C
  from jaxent.apps import _demo as D
  here = os.path.dirname(os.path.abspath(__file__))
  cfg = C.load(os.path.join(here, "..", "configs", "demo.yaml"))
  assert cfg == C.from_dict(D.BASE, D.METHODS["grpo"])
