"""`jaxent study`: the quick study end to end, its resume, the early-fit prediction, the decoy knob."""
import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from jaxent.apps import _study as S
from jaxent.apps._law_report import early_fit_prediction
from jaxent.data.arithmetic import (
    ArithmeticTask,
    CarryDecoy,
    CharTokenizer,
    DecoyLabels,
    make_decoy,
    operands_of_prompt,
)

METHODS = ("grpo", "kl_cov")


def _study(out, *extra):
  proc = subprocess.run([sys.executable, "-m", "jaxent.cli", "study", "--quick", "--methods",
                         *METHODS, "--out", out, *extra], capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


@pytest.fixture(scope="module")
def quick_study(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("study") / "study")
  proc = _study(out)
  return out, proc


# the table prints 3 decimals: half a unit of the last digit, and float rounding of that half
HALF_UNIT = 5e-4 + 1e-9


def test_quick_study_writes_every_output(quick_study):
  out, proc = quick_study
  summary = json.load(open(os.path.join(out, "study.json")))
  assert list(summary["methods"]) == list(METHODS)
  s = summary["settings"]
  for name in ("entropy.png", "accuracy.png", "law.png", "passk.png"):
    with open(os.path.join(out, name), "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n", name
  for method in METHODS:
    m = summary["methods"][method]
    (run_dir,) = m["run_dirs"]
    # an ordinary run directory
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    assert [r["step"] for r in rows] == list(range(1, s["rl_steps"] + 1))
    assert os.listdir(os.path.join(run_dir, "tb"))
    rec = json.load(open(os.path.join(run_dir, S.RUN_RECORD)))
    # the record re-derived from the run's own metrics
    assert rec["entropy"] == pytest.approx([r["entropy"] for r in rows])
    assert [e["step"] for e in rec["evals"]] == list(range(0, s["rl_steps"] + 1, s["eval_every"]))
    assert rec["final_entropy"] == pytest.approx(rows[-1]["entropy"])
    assert m["final_entropy"]["mean"] == pytest.approx(rec["final_entropy"])
    assert m["final_accuracy"]["mean"] == pytest.approx(rec["evals"][-1]["accuracy"])
    ks = sorted(int(k) for k in rec["passk"])
    assert ks == [1, 2, 4]
    pk = [rec["passk"][str(k)] for k in ks]
    assert all(0 <= p <= 1 for p in pk) and pk == sorted(pk)   # pass@k grows with k
    # pass@1 (unbiased) over the same samples is their mean accuracy
    assert rec["passk"]["1"] == pytest.approx(rec["final_accuracy"], abs=1e-9)
    assert "predicted_final" in rec["early_fit"] or "error" in rec["early_fit"]
    assert rec["tokens_generated"] > 0
  assert "vs_grpo" in summary and "kl_cov" in summary["vs_grpo"]
  assert "study.json" in proc.stdout


def _table(path):
  """The first table of a markdown file: (header, {first cell: {column: cell}})."""
  text = open(path, encoding="utf-8").read().splitlines()
  start = next(i for i, l in enumerate(text) if l.startswith("| "))
  lines = []
  for l in text[start:]:
    if not l.startswith("|"):
      break
    lines.append([x.strip() for x in l.strip("|").split("|")])
  header, rows = lines[0], lines[2:]                   # lines[1] is the --- separator
  assert set("".join(lines[1])) <= {"-", " "}
  return header, {r[0]: dict(zip(header, r)) for r in rows}


def test_table_matches_study_json(quick_study):
  out, _ = quick_study
  summary = json.load(open(os.path.join(out, "study.json")))
  header, rows = _table(os.path.join(out, "study.md"))
  assert tuple(header) == S.TABLE_COLUMNS
  assert set(rows) == set(METHODS)
  kmax = str(summary["settings"]["passk_max"])
  for method, m in summary["methods"].items():
    row = rows[method]
    # one seed: the cells are the means (no ± part)
    assert float(row["final H"]) == pytest.approx(m["final_entropy"]["mean"], abs=HALF_UNIT)
    assert float(row["acc mean@k"]) == pytest.approx(m["final_accuracy"]["mean"], abs=HALF_UNIT)
    assert float(row["acc greedy"]) == pytest.approx(m["final_greedy_accuracy"]["mean"], abs=HALF_UNIT)
    assert float(row["pass@1"]) == pytest.approx(m["passk"]["1"]["mean"], abs=HALF_UNIT)
    assert float(row["pass@K"]) == pytest.approx(m["passk"][kmax]["mean"], abs=HALF_UNIT)
    assert float(row["H / H0"]) == pytest.approx(m["entropy_ratio"]["mean"], abs=5e-3)
    assert float(row["wall s"]) == pytest.approx(m["seconds"]["mean"], abs=0.5)
    assert float(row["tokens"]) == pytest.approx(m["tokens_generated"]["mean"], abs=0.5)


def test_resume_redoes_only_what_did_not_finish(quick_study):
  out, _ = quick_study
  grpo_dir = os.path.join(out, "grpo", "seed0")
  kl_dir = os.path.join(out, "kl_cov", "seed0")
  before = {d: (os.stat(os.path.join(d, S.RUN_RECORD)).st_mtime_ns,
                open(os.path.join(d, "metrics.jsonl")).read()) for d in (grpo_dir, kl_dir)}
  params_mtime = os.stat(os.path.join(out, "warmstart", "params.npz")).st_mtime_ns
  # a run killed before it finished has no record
  os.remove(os.path.join(kl_dir, S.RUN_RECORD))
  proc = _study(out, "--resume")
  assert "warm start read back" in proc.stdout
  assert "supervised steps) ..." not in proc.stdout
  assert os.stat(os.path.join(out, "warmstart", "params.npz")).st_mtime_ns == params_mtime
  # the finished run is untouched, the unfinished one is run again
  assert re.search(r"grpo\s+seed 0: finished before \(reused\)", proc.stdout)
  assert not re.search(r"kl_cov\s+seed 0: finished before", proc.stdout)
  assert os.stat(os.path.join(grpo_dir, S.RUN_RECORD)).st_mtime_ns == before[grpo_dir][0]
  assert open(os.path.join(grpo_dir, "metrics.jsonl")).read() == before[grpo_dir][1]
  assert not [n for n in os.listdir(os.path.join(out, "grpo")) if ".old-" in n]
  assert os.path.isfile(os.path.join(kl_dir, S.RUN_RECORD))
  assert [n for n in os.listdir(os.path.join(out, "kl_cov")) if ".old-" in n]  # moved aside
  # the same seed and warm start give the same run again
  rec = json.load(open(os.path.join(kl_dir, S.RUN_RECORD)))
  old = [json.loads(l) for l in before[kl_dir][1].splitlines()]
  assert rec["entropy"] == pytest.approx([r["entropy"] for r in old], rel=1e-5)
  summary = json.load(open(os.path.join(out, "study.json")))
  assert list(summary["methods"]) == list(METHODS)


def test_early_fit_prediction_hand_computed():
  # exp(H) = 3, 2, 1.5 at steps 0, 25, 50 (the first quarter of 200 steps), accuracies
  # 3/10, 13/25, 29/50. Least squares by hand: mean x = 13/6, mean y = 7/15,
  # Sxy = -67/300, Sxx = 7/6, slope = -67/350, b = 7/15 + (67/350)(13/6) = 1851/2100.
  steps = [200, 0, 50, 25, 100]              # unordered: sorted by step
  x = [1.2, 3.0, 1.5, 2.0, 1.4]
  y = [0.70, 0.30, 0.58, 0.52, 0.60]
  got = early_fit_prediction(steps, np.log(x), y, total_steps=200, fraction=0.25)
  a, b = 67 / 350, 1851 / 2100
  assert got["n_fit"] == 3
  assert got["a"] == pytest.approx(a, rel=1e-12)
  assert got["b"] == pytest.approx(b, rel=1e-12)
  assert got["ceiling"] == pytest.approx(b - a, rel=1e-12)  # 1449/2100 = 0.69
  assert got["ceiling"] == pytest.approx(0.69, rel=1e-12)
  assert got["last_step"] == 200 and got["last_entropy"] == pytest.approx(math.log(1.2))
  assert got["predicted_final"] == pytest.approx(-a * 1.2 + b, rel=1e-12)
  assert got["realised_final"] == 0.70
  assert got["error"] == pytest.approx(-a * 1.2 + b - 0.70, rel=1e-12)
  # r2 on the fitted points, from NumPy's float64 least squares
  slope, icpt = np.polyfit([3.0, 2.0, 1.5], [0.30, 0.52, 0.58], 1)
  res = np.array([0.30, 0.52, 0.58]) - (slope * np.array([3.0, 2.0, 1.5]) + icpt)
  tot = np.array([0.30, 0.52, 0.58]) - np.mean([0.30, 0.52, 0.58])
  assert got["r2"] == pytest.approx(1 - (res @ res) / (tot @ tot), rel=1e-10)


def test_early_fit_prediction_refuses_too_few_early_points():
  with pytest.raises(ValueError, match="at least 3 evaluations"):
    early_fit_prediction([0, 50, 100, 200], np.log([3, 2, 1.5, 1.2]), [0.3, 0.5, 0.6, 0.7],
                         total_steps=200)
  with pytest.raises(ValueError, match="one length"):
    early_fit_prediction([0, 50], [1.0], [0.3, 0.5], total_steps=200)


def test_decoy_labels_hand_cases():
  task = ArithmeticTask(num_operands=3, num_digits=1)
  d = DecoyLabels(last_operand=9, prob=1.0, offset=-1)
  assert d.decoy(task, [1, 2, 9]) == "3;11$"       # 1+2+9 = 12, decoy 11
  assert list(d.applies(np.array([[1, 2, 9], [1, 9, 2]]))) == [True, False]
  rng = np.random.default_rng(0)
  assert d.label(task, [1, 2, 9], rng) == "3;11$"
  assert d.label(task, [1, 9, 2], rng) == task.answer([1, 9, 2]) == "10;12$"
  assert DecoyLabels(prob=0.0).label(task, [1, 2, 9], rng) == "3;12$"
  assert operands_of_prompt(task.prompt([4, 5, 6])) == [4, 5, 6]
  with pytest.raises(ValueError, match="prob"):
    DecoyLabels(prob=1.5)
  with pytest.raises(ValueError, match="offset"):
    DecoyLabels(offset=0)
  with pytest.raises(ValueError, match="arithmetic prompt"):
    operands_of_prompt("1+2")


def test_decoy_warm_start_labels_follow_prob():
  """The warm start's supervised answers on the subset are the decoy with probability prob."""
  from jaxent.apps._demo import _sft_batches
  task, tok = ArithmeticTask(num_operands=3, num_digits=1), CharTokenizer()
  d = DecoyLabels(last_operand=9, prob=0.7)
  n = 4000
  batch = _sft_batches(task, tok, n, seed=3, noise=0.0, decoy=d)
  ops = task.sample_operands(n, seed=3, unique=False)
  mask = np.asarray(batch.response_mask)
  toks = np.asarray(batch.tokens)[:, -mask.shape[1]:]   # the response is the last R positions
  resp = [tok.decode(t[m > 0]) for t, m in zip(toks, mask)]
  sub = d.applies(ops)
  decoyed = np.array([r == d.decoy(task, o) for r, o in zip(resp, ops)])
  right = np.array([r == task.answer(o) for r, o in zip(resp, ops)])
  assert (decoyed | right).all() and not decoyed[~sub].any()
  m = int(sub.sum())
  p_hat = decoyed[sub].mean()
  assert abs(p_hat - 0.7) < 4 * math.sqrt(0.7 * 0.3 / m), (p_hat, m)   # binomial, 4 sigma


def test_carry_decoy_hand_cases():
  task = ArithmeticTask(num_operands=3, num_digits=1)
  d = CarryDecoy(prob=1.0)
  # 4+5 = 9, 9+3 = 12: the last addition carries (9 + 3 >= 10); the decoy drops it: 2
  assert d.decoy(task, [4, 5, 3]) == "9;2$"
  # 7+8 = 15, 15+6 = 21: 5 + 6 >= 10 carries; decoy 11 (the tens digit of 15 copied)
  assert d.decoy(task, [7, 8, 6]) == "15;11$"
  # 7+8 = 15, 15+4 = 19: no carry (5 + 4 = 9); 1+9 = 10, 10+9 = 19: no carry (0 + 9)
  ops = np.array([[4, 5, 3], [7, 8, 6], [7, 8, 4], [1, 9, 9], [9, 9, 2]])
  assert list(d.applies(ops)) == [True, True, False, False, True]   # 18 + 2: 8 + 2 >= 10
  with pytest.raises(ValueError, match="does not carry"):
    d.decoy(task, [7, 8, 4])
  rng = np.random.default_rng(0)
  assert d.label(task, [4, 5, 3], rng) == "9;2$"
  assert d.label(task, [7, 8, 4], rng) == task.answer([7, 8, 4]) == "15;19$"
  assert CarryDecoy(prob=0.0).label(task, [4, 5, 3], rng) == "9;12$"
  # two-digit operands: the units carry of the last addition
  task2 = ArithmeticTask(num_operands=2, num_digits=2)
  assert list(d.applies(np.array([[15, 27], [15, 24]]))) == [True, False]
  assert d.decoy(task2, [15, 27]) == "32$"                          # 42 - 10
  with pytest.raises(ValueError, match="prob"):
    CarryDecoy(prob=1.5)
  with pytest.raises(ValueError, match="num_operands"):
    d.applies(np.array([1, 2, 3]))


def test_make_decoy_kinds():
  assert make_decoy(None) is None
  assert make_decoy({"last_operand": 8, "prob": 0.5, "offset": 2}) == DecoyLabels(8, 0.5, 2)
  assert make_decoy({"kind": "offset", "prob": 0.5}) == DecoyLabels(prob=0.5)
  assert make_decoy({"kind": "carry", "prob": 0.25}) == CarryDecoy(prob=0.25)
  with pytest.raises(ValueError, match="unknown decoy kind 'nope'"):
    make_decoy({"kind": "nope"})
  with pytest.raises(ValueError, match="carry.*offset"):
    make_decoy({"kind": "carry", "offset": -1})
  with pytest.raises(ValueError, match="settings.decoy.*kind"):
    S.StudySettings(decoy={"kind": "nope"}).validate()


def test_carry_decoy_warm_start_labels_follow_prob():
  """The warm start's supervised answers on the carry subset are the decoy with probability prob,
  and the subset is the problems whose last addition carries (counted here by brute force)."""
  from jaxent.apps._demo import _sft_batches
  task, tok = ArithmeticTask(num_operands=5, num_digits=1), CharTokenizer()
  d = CarryDecoy(prob=0.6)
  n = 4000
  batch = _sft_batches(task, tok, n, seed=5, noise=0.0, decoy=d)
  ops = task.sample_operands(n, seed=5, unique=False)
  mask = np.asarray(batch.response_mask)
  toks = np.asarray(batch.tokens)[:, -mask.shape[1]:]
  resp = [tok.decode(t[m > 0]) for t, m in zip(toks, mask)]
  sub = np.array([sum(o[:-1]) % 10 + o[-1] >= 10 for o in ops.tolist()])
  assert (d.applies(ops) == sub).all()
  right = np.array([r == task.answer(o) for r, o in zip(resp, ops)])
  decoyed = np.array([s and r == task.answer(o).rsplit(";", 1)[0] + f";{sum(o) - 10}$"
                      for s, r, o in zip(sub, resp, ops.tolist())])
  assert (decoyed | right).all() and not decoyed[~sub].any()
  m = int(sub.sum())
  assert 0.4 < m / n < 0.6
  p_hat = decoyed[sub].mean()
  assert abs(p_hat - 0.6) < 4 * math.sqrt(0.6 * 0.4 / m), (p_hat, m)   # binomial, 4 sigma


def test_study_file_errors_are_named(tmp_path):
  bad = tmp_path / "s.yaml"
  bad.write_text("settings: {rl_step: 3}\nmethods: {grpo: {loss.name: ppo_clip}}\n")
  with pytest.raises(ValueError, match="rl_step"):
    S.load_plan(str(bad))
  bad.write_text("methods: {grpo: {loss.name: nope}}\n")
  with pytest.raises(ValueError, match="grpo"):
    S.load_plan(str(bad))
  with pytest.raises(ValueError, match="unknown method"):
    S.load_plan(None, methods=["nope"])


def test_every_study_method_builds_its_config():
  plan = S.load_plan(None)
  assert set(plan.methods) == {"grpo", "clip_higher", "entropy_bonus", "adaptive_entropy",
                               "top_entropy", "gspo", "cispo", "clip_cov", "kl_cov"}
  cfgs = {m: S.run_config(plan, m, 0) for m in plan.methods}
  assert cfgs["clip_higher"].loss.clip_high == 0.28
  assert cfgs["top_entropy"].loss.top_entropy_quantile == 0.2
  assert cfgs["adaptive_entropy"].loss.adaptive_entropy.target == 0.4
  assert cfgs["gspo"].loss.name == "gspo" and cfgs["gspo"].loss.clip_low is None
  # the methods share everything but the loss
  strip = lambda c: {k: v for k, v in c.__dict__.items() if k not in ("loss", "name")}  # noqa: E731
  assert all(strip(c) == strip(cfgs["grpo"]) for c in cfgs.values())


@pytest.mark.parametrize("name", ["study", "decoy", "decoy_p98", "decoy_p98_n05", "decoy_mb8",
                                  "carry", "carry200"])
def test_every_study_file_validates(name):
  here = os.path.dirname(os.path.abspath(__file__))
  path = os.path.join(here, "..", "configs", "study", f"{name}.yaml")
  for quick in (False, True):
    plan = S.load_plan(path, quick=quick)          # every method's config is built and validated
    assert plan.methods and "grpo" in plan.methods
    steps = plan.settings.eval_steps
    assert steps[0] == 0 and steps[-1] == plan.settings.rl_steps
    # the early fit has its 3 evaluations in the first early_fraction of the steps
    assert sum(t <= plan.settings.early_fraction * plan.settings.rl_steps for t in steps) >= 3
  assert len(set(os.listdir(os.path.dirname(path)))) == 7   # no study file left untested
