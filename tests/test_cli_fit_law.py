"""`jaxent fit-law` end to end on synthetic run directories."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from jaxent import cli

_A, _B = 0.4, 0.9
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _records(n=60, sigma=0.005, seed=0):
  rng = np.random.default_rng(seed)
  h = 0.15 + 1.2 * np.exp(-np.arange(n) / 12)
  acc = -_A * np.exp(h) + _B + sigma * rng.normal(size=n)
  return [{"step": i, "entropy": float(h[i]), "accuracy": float(acc[i]),
           "reward": float(acc[i] + 0.1), "eval": {"acc": float(acc[i])}}
          for i in range(n)], h, acc


def _write(run_dir, lines):
  os.makedirs(run_dir, exist_ok=True)
  with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
    for line in lines:
      f.write(line if isinstance(line, str) else json.dumps(line))
      f.write("\n")


def _law(run_dir):
  with open(os.path.join(run_dir, "law.json")) as f:
    return json.load(f)


def test_fit_law_writes_json_and_png(tmp_path, capsys):
  recs, h, acc = _records()
  k = 30
  lines = [json.dumps(r) for r in recs]
  # Junk the reader must skip and count: malformed JSON, a non-object, lines
  # lacking a key, a NaN value, and a blank line (not counted).
  lines[5:5] = ["{not json", "[1, 2]", json.dumps({"step": 100, "loss": 1.0}),
                json.dumps({"step": 101, "entropy": 0.5}),
                '{"step": 102, "entropy": NaN, "accuracy": 0.3}', ""]
  _write(tmp_path, lines)

  rc = cli.main(["fit-law", str(tmp_path), "--fit-first", str(k)])
  out = capsys.readouterr().out
  assert rc == 0
  assert len(out.strip().splitlines()) == 1 and "ceiling" in out

  law = _law(tmp_path)
  slope, icpt = np.polyfit(np.exp(h[:k]), acc[:k], 1)
  assert law["a"] == pytest.approx(-slope, rel=1e-9)
  assert law["b"] == pytest.approx(icpt, rel=1e-9)
  assert law["ceiling"] == pytest.approx(law["b"] - law["a"])
  assert abs(law["a"] - _A) < 0.02 and abs(law["b"] - _B) < 0.02
  assert 0.9 < law["r2"] <= 1.0
  err = acc[k:] - (slope * np.exp(h[k:]) + icpt)
  assert law["pred_rmse"] == pytest.approx(np.sqrt(np.mean(err**2)))
  assert (law["x_key"], law["y_key"], law["method"]) == ("entropy", "accuracy", "ols")
  assert (law["n_points"], law["n_fit"], law["n_pred"]) == (60, k, 60 - k)
  assert law["skipped"] == {"malformed": 2, "missing_key": 2, "non_finite": 1}
  with open(tmp_path / "law.png", "rb") as f:
    assert f.read(8) == _PNG_MAGIC


def test_fit_law_keys_order_and_method(tmp_path):
  recs, h, acc = _records(seed=1)
  # Shuffled lines (a resumed run) are put back in step order.
  shuffled = [recs[i] for i in np.random.default_rng(2).permutation(len(recs))]
  _write(tmp_path, shuffled)
  assert cli.main(["fit-law", str(tmp_path), "--y-key", "eval.acc",
                   "--fit-first", "20", "--method", "huber"]) == 0
  law = _law(tmp_path)
  assert law["y_key"] == "eval.acc" and law["method"] == "huber"
  assert (law["first_step"], law["last_step"]) == (0, 59)
  assert abs(law["a"] - _A) < 0.02 and abs(law["b"] - _B) < 0.02

  # Without "accuracy" the default y key falls back to "reward".
  for r in recs:
    del r["accuracy"]
  _write(tmp_path, recs)
  assert cli.main(["fit-law", str(tmp_path)]) == 0
  law = _law(tmp_path)
  assert law["y_key"] == "reward"
  assert law["b"] == pytest.approx(np.polyfit(np.exp(h), acc + 0.1, 1)[1], rel=1e-9)


@pytest.mark.parametrize("case,match", [
    ("no_dir", "not found"),
    ("no_file", "no metrics.jsonl"),
    ("no_keys", "--y-key"),
    ("only_malformed", "none of its"),
    ("constant_entropy", "constant"),
    ("fit_first_too_big", "fit_first"),
])
def test_fit_law_bad_input_exits_2(tmp_path, capsys, case, match):
  run = tmp_path / "run"
  argv = ["fit-law", str(run)]
  if case == "no_file":
    run.mkdir()
  elif case == "no_keys":
    _write(run, [{"step": 0, "loss": 1.0}])
  elif case == "only_malformed":
    _write(run, ["{oops", json.dumps({"step": 1, "entropy": 0.4, "accuracy": "high"})])
    argv += ["--y-key", "accuracy"]
  elif case == "constant_entropy":
    _write(run, [{"step": i, "entropy": 0.5, "accuracy": 0.1 * i} for i in range(5)])
  elif case == "fit_first_too_big":
    _write(run, _records(n=10)[0])
    argv += ["--fit-first", "10"]
  rc = cli.main(argv)
  err = capsys.readouterr().err
  assert rc == 2
  assert match in err
  assert not (run / "law.json").exists()


def test_cli_usage_errors_exit_2(capsys):
  assert cli.main([]) == 2
  assert cli.main(["fit-law"]) == 2
  assert cli.main(["no-such-command"]) == 2
  assert cli.main(["fit-law", "x", "--method", "l1"]) == 2
  capsys.readouterr()


def test_fit_law_console_script(tmp_path):
  _write(tmp_path, _records(n=20)[0])
  # The installed entry point (pyproject [project.scripts]) when present.
  script = os.path.join(os.path.dirname(sys.executable), "jaxent")
  cmd = [script] if os.path.exists(script) else [sys.executable, "-m", "jaxent.cli"]
  ok = subprocess.run(cmd + ["fit-law", str(tmp_path)], capture_output=True,
                      text=True, timeout=120)
  assert ok.returncode == 0, ok.stderr
  assert "ceiling" in ok.stdout and (tmp_path / "law.png").exists()
  bad = subprocess.run(cmd + ["fit-law", str(tmp_path / "missing")],
                       capture_output=True, text=True, timeout=120)
  assert bad.returncode == 2 and "not found" in bad.stderr
