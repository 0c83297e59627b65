"""`jaxent demo --quick`: the embedded default end to end (smoke version)."""
import json
import os
import subprocess
import sys

import numpy as np
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
    for key in ("initial_entropy", "final_entropy", "final_accuracy", "law", "early_fit", "per_seed"):
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


def test_early_fit_pools_the_seeds_early_points_and_predicts_their_ends():
  """The demo's early fit against a float64 NumPy least-squares line of accuracy on exp(H)
  through the pooled points at steps <= 0.25 x 40, and its mean prediction at each seed's
  last evaluation."""
  from jaxent.apps._demo import early_fit
  rng = np.random.default_rng(0)

  def run(h0):
    ent = list(h0 * np.exp(-np.arange(1, 41) / 15) + 0.01 * rng.standard_normal(40))
    evals = [{"step": st, "eval_accuracy": float(0.9 - 0.3 * np.exp(ent[st - 1])
                                                  + 0.02 * rng.standard_normal())}
             for st in (4, 8, 10, 20, 30, 40)]
    return {"entropy": ent, "evals": evals}
  runs = [run(0.8), run(0.7)]
  got = early_fit(runs, total_steps=40, fraction=0.25)
  x = np.array([np.exp(r["entropy"][e["step"] - 1]) for r in runs for e in r["evals"]
                if e["step"] <= 10])
  y = np.array([e["eval_accuracy"] for r in runs for e in r["evals"] if e["step"] <= 10])
  slope, icpt = np.polyfit(x, y, 1)
  a, b = -slope, icpt
  assert got["n_fit"] == 6
  np.testing.assert_allclose([got["a"], got["b"], got["ceiling"]], [a, b, b - a], rtol=1e-9)
  h_last = np.array([r["entropy"][39] for r in runs])
  want = np.mean(-a * np.exp(h_last) + b)
  np.testing.assert_allclose(got["predicted_final"], want, rtol=1e-9)
  np.testing.assert_allclose(got["realised_final"],
                             np.mean([r["evals"][-1]["eval_accuracy"] for r in runs]), rtol=1e-12)
  np.testing.assert_allclose(got["error"], want - got["realised_final"], rtol=1e-9)
  # Too few early evaluations: a message, not a fit.
  short = early_fit(runs, total_steps=40, fraction=0.15)   # steps <= 6: two points
  assert "got 2 of 12" in short["error_message"] and "predicted_final" not in short
