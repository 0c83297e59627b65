"""`jaxent eval`: the paper's presets, their resolution, field aliases, the report, the CLI.

The end-to-end tests run a tiny random Qwen2 saved as a Hugging Face
directory with a tokenizer of single characters (digits, + - *) and EOS, on
benchmark files named like the public copies (aime24.jsonl, math500.jsonl),
graded by the real math grader.
"""
import json
import os
import re

import numpy as np
import pytest

from jaxent import cli, data, sampler
from jaxent import eval as E
from jaxent import train as T
from tests._tiny import save_char_model

# One character a token: a decoded response splits back into its tokens.
WORDS = ["<unk>", "</s>"] + [str(d) for d in range(10)] + ["+", "-", "*"]
EOS = 1
MAX_NEW = 2  # the response budget the CLI tests give (--max-new-tokens)


# --- presets: by name, by file name --------------------------------------------------------

@pytest.mark.parametrize("name,want", [
    ("aime24", "aime24"), ("AIME-2024", "aime24"), ("aime_2025", "aime25"), ("AIME25", "aime25"),
    ("amc", "amc"), ("AMC23", "amc"), ("amc_2023", "amc"), ("math500", "math500"),
    ("MATH-500", "math500"), ("gsm8k", None), ("aime", None), ("math5000", None), ("aime24x", None),
])
def test_preset_by_name(name, want):
  p = E.preset_for_name(name)
  assert (p and p.name) == want


@pytest.mark.parametrize("path,want", [
    ("data/aime24.jsonl", "aime24"), ("AIME_2025.jsonl", "aime25"), ("aime_2024_I.jsonl", "aime24"),
    ("math500.jsonl", "math500"), ("/x/math-500.jsonl", "math500"),
    ("MATH_500_test.jsonl", "math500"),
    ("test_math500.parquet", "math500"), ("amc23.jsonl", "amc"), ("AMC.jsonl", "amc"),
    ("heldout.jsonl", None), ("amc12.jsonl", None), ("math5000.jsonl", None), ("aime.jsonl", None),
])
def test_preset_by_file_name(path, want):
  p = E.preset_for_file(path)
  assert (p and p.name) == want


def test_paper_decoding_in_the_presets():
  """REFERENCE.md: T=0.6, mean@32 for AIME/AMC, greedy elsewhere; response 8192, prompt 2048."""
  for name in ("aime24", "aime25", "amc"):
    s = E.PRESETS[name].settings
    got = (s.k, s.temperature, s.top_p, s.max_new_tokens, s.max_prompt_len)
    assert got == (32, 0.6, 1.0, 8192, 2048)
  s = E.PRESETS["math500"].settings
  assert (s.k, s.temperature, s.max_new_tokens, s.reward) == (1, 0.0, 8192, "math")


# --- overrides ----------------------------------------------------------------------------

def test_override_precedence_and_notes():
  b = E.resolve_benchmark("aime24=x.jsonl", {"k": 4, "top_p": 0.9, "reward": None})
  assert (b.name, b.path, b.preset) == ("aime24", "x.jsonl", "aime24")
  # T from the preset, k and top_p from the overrides
  assert (b.settings.k, b.settings.temperature, b.settings.top_p) == (4, 0.6, 0.9)
  assert b.overrides == ("k", "top_p") and not b.notes
  # a file name picks the preset; an explicit prompt key replaces its aliases
  b = E.resolve_benchmark("d/AIME_2025.jsonl", {"prompt_key": "q"})
  assert b.preset == "aime25" and b.settings.prompt_keys == ("q",) and b.settings.k == 32
  # greedy keeps one sample, whether k came from a flag or from the preset, and says so
  b = E.resolve_benchmark("math500=m.jsonl", {"k": 8})
  assert (b.settings.k, b.settings.temperature) == (1, 0.0) and "k=8 dropped" in b.notes[0]
  b = E.resolve_benchmark("aime24.jsonl", {"temperature": 0.0})
  assert b.settings.k == 1 and "k=32 dropped" in b.notes[0]
  # no preset: the flags over the defaults, with a note; the label is the file name
  b = E.resolve_benchmark("runs/heldout.jsonl", {"temperature": 1.0, "k": 2})
  got = (b.name, b.preset, b.settings.k, b.settings.max_new_tokens)
  assert got == ("heldout.jsonl", None, 2, 1024)
  assert "no preset" in b.notes[0]
  # an explicit unknown name is a label only when the flags say how to decode
  assert E.resolve_benchmark("gsm=g.jsonl", {"temperature": 0.3}).name == "gsm"
  with pytest.raises(ValueError, match="unknown benchmark 'gsm'.*--temperature"):
    E.resolve_benchmark("gsm=g.jsonl", {"reward": "math"})
  # presets off: the file name means nothing
  b = E.resolve_benchmark("aime24.jsonl", presets=False)
  assert b.preset is None and b.settings == E.EvalSettings() and not b.notes


@pytest.mark.parametrize("over,match", [
    ({"k": 0}, "k .*>= 1"), ({"top_p": 0.0}, "top_p"), ({"temperature": -1.0}, "temperature"),
    ({"max_new_tokens": 0}, "max_new_tokens"), ({"reward": "nope"}, "nope"), ({"kk": 1}, "kk"),
])
def test_bad_settings_name_the_setting(over, match):
  with pytest.raises(ValueError, match=match):
    E.resolve_benchmark("aime24=x.jsonl", over)


def test_samples_per_call_divides_k():
  cases = [(32, 64), (32, 20), (6, 4), (7, 4), (1, 1)]
  assert [E.samples_per_call(k, rows) for k, rows in cases] == [32, 16, 3, 1, 1]


# --- field aliases ------------------------------------------------------------------------

def _write(path, rows):
  with open(path, "w") as f:
    for r in rows:
      f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
  return str(path)


def test_field_aliases_and_missing_fields(tmp_path):
  aime, m500 = E.PRESETS["aime24"].settings, E.PRESETS["math500"].settings
  for row, settings, want in [
      ({"problem": "p", "answer": 3}, aime, ("problem", "answer")),
      ({"question": "p", "answer": "3"}, aime, ("question", "answer")),
      ({"Problem": "p", "Solution": "s", "Answer": 3}, aime, ("Problem", "Answer")),
      ({"problem": "p", "solution": "s \\boxed{3}", "answer": "3"}, m500, ("problem", "answer")),
      ({"problem": "p", "solution": "s \\boxed{3}"}, m500, ("problem", "solution")),
  ]:
    path = _write(tmp_path / "b.jsonl", ["", "not json", row])
    assert E.resolve_fields(path, settings.prompt_keys, settings.answer_keys) == want
  path = _write(tmp_path / "aime24.jsonl", ["{oops", {"problem": "p", "solution": "s"}])
  with pytest.raises(data.DataError) as e:
    E.resolve_fields(path, aime.prompt_keys, aime.answer_keys)
  msg = str(e.value)
  assert path in msg and "line 2" in msg and "--answer-key" in msg
  assert "['problem', 'solution']" in msg  # the keys present
  with pytest.raises(data.DataError, match="not found.*nope.jsonl"):
    E.resolve_fields(str(tmp_path / "nope.jsonl"), ("p",), ("a",))


# --- a tiny model, benchmark files --------------------------------------------------------

@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  return save_char_model(tmp_path_factory.mktemp("hf") / "tiny", WORDS, eos_id=EOS, seed=1,
                         num_heads=2, num_kv_heads=1, head_dim=16, tie_word_embeddings=True)


PROBLEMS = [("3+4", "7"), ("1+1", 2), ("5*4-11", "9")]


@pytest.fixture(scope="module")
def bench_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("bench")
  _write(d / "aime24.jsonl", [{"problem": p, "answer": a} for p, a in PROBLEMS])
  # MATH-500's fields; a malformed row and one without an answer are skipped and counted
  _write(d / "math500.jsonl", [{"problem": p, "solution": "...", "answer": a} for p, a in PROBLEMS]
         + ["{not json", {"problem": "2+2"}])
  return d


def _read_jsonl(path):
  return [json.loads(line) for line in open(path)]


def test_ragged_batches_compile_once_and_report(hf_dir, bench_dir):
  """Rows count prompts x samples; the ragged last call reuses the compiled programs."""
  model, tok, _ = T.load_model_or_run(hf_dir)
  bench = E.resolve_benchmark(str(bench_dir / "aime24.jsonl"), {"k": 4, "max_new_tokens": 3})
  before = dict(sampler.TRACE_COUNTS)
  rep, samples = E.evaluate_benchmark(model, tok, bench, batch_size=8, return_samples=True)
  # 3 prompts x 4 samples in calls of 2 prompts (8 rows) and 1 prompt: one trace each
  assert sampler.TRACE_COUNTS["prefill"] - before.get("prefill", 0) == 1
  assert sampler.TRACE_COUNTS["decode"] - before.get("decode", 0) == 1
  got = (rep["benchmark"], rep["preset"], rep["k"], rep["temperature"])
  assert got == ("aime24", "aime24", 4, 0.6)
  assert (rep["prompts"], rep["samples"], rep["max_new_tokens"]) == (3, 12, 3)
  assert rep["overrides"] == ["k", "max_new_tokens"] and rep["skipped_rows"] == 0
  assert (rep["prompt_key"], rep["answer_key"]) == ("problem", "answer")
  r = np.array([s["reward"] for s in samples]).reshape(3, 4)
  order = [(s["index"], s["sample"]) for s in samples]
  assert order == [(i, j) for i in range(3) for j in range(4)]
  assert rep["mean@4"] == pytest.approx(r.mean())
  assert rep["pass@4"] == pytest.approx(np.mean((r >= 0.5).any(axis=1)))
  lengths = np.array([s["length"] for s in samples])
  assert rep["mean_response_len"] == pytest.approx(lengths.mean())
  assert rep["truncated_frac"] == pytest.approx(np.mean([not s["finished"] for s in samples]))
  # k above the row budget: equal calls of a divisor of k
  rep2 = E.evaluate_benchmark(model, tok, bench, batch_size=2)
  assert rep2["samples"] == 12 and 0 <= rep2["mean@4"] <= rep2["pass@4"] <= 1


def _greedy_reference(model, prompt_ids, resp_ids):
  """Each response token is the argmax after its prefix (one teacher-forced forward)."""
  seq = np.asarray([list(prompt_ids) + list(resp_ids)], np.int32)
  logits = np.asarray(model(seq))[0]
  p = len(prompt_ids)
  return [int(np.argmax(logits[p - 1 + t])) for t in range(len(resp_ids) + 1)]


def test_cli_end_to_end_presets_from_file_names(hf_dir, bench_dir, tmp_path, capsys):
  aime, m500 = str(bench_dir / "aime24.jsonl"), str(bench_dir / "math500.jsonl")
  out, smp = str(tmp_path / "r" / "eval.json"), str(tmp_path / "samples.jsonl")
  assert cli.main(["eval", hf_dir, "--data", aime, "--data", m500, "--max-new-tokens", str(MAX_NEW),
                   "--out", out, "--samples-out", smp]) == 0
  table = capsys.readouterr().out
  assert "aime24" in table and "math500" in table and "mean@k" in table
  reports = {r["benchmark"]: r for r in json.load(open(out))}
  a, m = reports["aime24"], reports["math500"]
  # AIME: the paper's T=0.6, mean@32; the response budget is the flag's
  assert (a["preset"], a["k"], a["temperature"], a["top_p"], a["max_new_tokens"]) == \
      ("aime24", 32, 0.6, 1.0, MAX_NEW)
  assert a["overrides"] == ["max_new_tokens"] and a["prompts"] == 3 and a["samples"] == 96
  assert a["model"] == hf_dir and a["file"] == aime
  # MATH-500: greedy, one sample; the two bad rows are skipped and counted
  assert (m["preset"], m["k"], m["temperature"], m["samples"]) == ("math500", 1, 0.0, 3)
  assert m["skipped_rows"] == 2 and m["skipped"] == {"malformed": 1, "missing_field": 1}
  rows = _read_jsonl(smp)
  ra = [s for s in rows if s["benchmark"] == "aime24"]
  assert len(ra) == 96
  for i in range(3):
    assert sorted(s["sample"] for s in ra if s["index"] == i) == list(range(32))
  r = np.array([s["reward"] for s in ra]).reshape(3, 32)
  assert a["mean@32"] == pytest.approx(r.mean()) and a["pass@32"] == pytest.approx(
      np.mean(r.max(axis=1) >= 0.5))
  assert r.sum() > 0  # some samples are right, so the recomputation is not 0 == 0
  for s in ra:  # the grader agrees with the obvious cases
    if s["response"].strip() == str(s["answer"]):
      assert s["reward"] == 1.0
    if not any(c.isdigit() for c in s["response"]):
      assert s["reward"] == 0.0
  assert len({s["response"] for s in ra}) > 1  # sampled, not greedy

  # greedy: identical responses with another seed and row budget, and each token is the argmax
  smp2 = str(tmp_path / "samples2.jsonl")
  assert cli.main(["eval", "--model", hf_dir, "--benchmarks", f"math500={m500}", "--max-new-tokens",
                   str(MAX_NEW), "--seed", "7", "--batch-size", "1", "--samples-out", smp2]) == 0
  rm = [s for s in rows if s["benchmark"] == "math500"]
  rm2 = _read_jsonl(smp2)
  assert [s["response"] for s in rm] == [s["response"] for s in rm2]
  model, tok, _ = T.load_model_or_run(hf_dir)
  vocab = {w: i for i, w in enumerate(WORDS)}
  for s in rm:
    prompt_ids = tok.encode(s["prompt"], add_special_tokens=True)
    resp = [vocab[c] for c in s["response"]]
    want = _greedy_reference(model, prompt_ids, resp)
    assert resp == want[:len(resp)]
    assert s["length"] == len(resp) + s["finished"]
    if s["finished"]:
      assert want[len(resp)] == EOS
    else:
      assert s["length"] == MAX_NEW


@pytest.mark.parametrize("argv,match", [
    (["{m}", "--data", "{b}/missing.jsonl"], "missing.jsonl"),
    (["{m}", "--benchmarks", "gsm8k={b}/aime24.jsonl"], "unknown benchmark 'gsm8k'"),
    (["{m}", "--data", "{b}/aime24.jsonl", "--k", "0"], "k .*>= 1"),
    (["{m}", "--data", "{b}/aime24.jsonl", "--prompt-key", "question"], "no prompt field"),
    (["{m}", "--data", "{b}/aime24.jsonl", "--batch-size", "0"], "--batch-size"),
    (["--data", "{b}/aime24.jsonl"], "no model"),
    (["{m}"], "no benchmark"),
    (["{b}/nomodel", "--data", "{b}/aime24.jsonl"], "neither"),
])
def test_cli_bad_input_exit_2(hf_dir, bench_dir, capsys, argv, match):
  argv = [a.format(m=hf_dir, b=bench_dir) for a in argv]
  assert cli.main(["eval", *argv]) == 2
  err = capsys.readouterr().err
  assert err.startswith("jaxent: error:") and len(err.strip().splitlines()) == 1
  assert re.search(match, err), err


def test_cli_model_that_cannot_load_is_one_error_line(hf_dir, bench_dir, tmp_path, capsys):
  import shutil
  broken = tmp_path / "noweights"
  broken.mkdir()
  shutil.copy(os.path.join(hf_dir, "config.json"), broken)   # a config, no weights
  assert cli.main(["eval", str(broken), "--data", os.path.join(bench_dir, "aime24.jsonl")]) == 2
  err = capsys.readouterr().err
  assert err.startswith("jaxent: error:") and len(err.strip().splitlines()) == 1, err
  assert "safetensors" in err, err


def test_pass_at_k_against_brute_force():
  from itertools import combinations
  rng = np.random.default_rng(0)
  correct = rng.random((20, 6)) < 0.3
  for k in (1, 2, 4, 6):
    brute = np.mean([np.mean([any(row[list(c)]) for c in combinations(range(6), k)]) for row in correct])
    assert E.pass_at_k(correct, k) == pytest.approx(brute)
