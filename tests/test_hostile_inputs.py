"""Hostile but ordinary inputs: files that are not files, huge rows, looping chat
templates, malformed model directories, degenerate fit-law series, ``python -m jaxent``.

Every check that could hang if its guarantee broke runs under a bound: a
subprocess with a timeout, or a daemon thread joined with a timeout
(``_bounded``), so a regression fails the test instead of stalling the suite.
"""
import json
import math
import os
import re
import socket
import struct
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import yaml

from jaxent import cli, files, models
from jaxent import data as D
from jaxent.errors import InputFileError
from tests._tiny import TWO_HEAD_ARCH

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
BOUND_S = 20.0  # far above any passing case; only a hang reaches it


def _bounded(fn, timeout=BOUND_S):
  """``fn()`` in a daemon thread: its result or exception, or a test failure after ``timeout``."""
  out = {}

  def run():
    try:
      out["value"] = fn()
    except BaseException as e:  # noqa: BLE001 - handed to the test
      out["error"] = e

  t = threading.Thread(target=run, daemon=True)
  t.start()
  t.join(timeout)
  assert not t.is_alive(), f"still blocked after {timeout} s"
  if "error" in out:
    raise out["error"]
  return out.get("value")


def _jaxent(*args, timeout=120):
  """``python -m jaxent ARGS`` in a subprocess: (exit code, stderr lines other than eval's notes)."""
  p = subprocess.run([sys.executable, "-m", "jaxent", *args], capture_output=True, text=True,
                     timeout=timeout, env=ENV, cwd=ROOT)
  return p.returncode, [line for line in p.stderr.splitlines()
                        if line.strip() and not line.startswith("jaxent eval: ")]


def _fifo(path):
  os.mkfifo(path)
  return str(path)


# ------------------------------------------------------------------------- non-regular files ---

@pytest.fixture
def specials(tmp_path):
  """A FIFO with no writer, a directory, a character device, a socket, a symlink to a file."""
  regular = tmp_path / "regular.jsonl"
  regular.write_text('{"prompt": "1+1=", "answer": "2"}\n')
  link = tmp_path / "link.jsonl"
  link.symlink_to(regular)
  sock = socket.socket(socket.AF_UNIX)
  sock.bind(str(tmp_path / "sock.jsonl"))
  (tmp_path / "dir.jsonl").mkdir()
  yield {"fifo": _fifo(tmp_path / "fifo.jsonl"), "directory": str(tmp_path / "dir.jsonl"),
         "character device": "/dev/zero", "socket": str(tmp_path / "sock.jsonl"),
         "regular": str(regular), "link": str(link)}
  sock.close()


def test_open_regular_refuses_every_non_regular_file_without_blocking(specials):
  kinds = {"fifo": "a FIFO (named pipe)", "directory": "a directory",
           "character device": "a character device", "socket": "a socket"}
  for key, kind in kinds.items():
    path = specials[key]
    for check in (lambda: files.open_regular(path, what="data file"),
                  lambda: files.require_regular(path, "data file")):
      with pytest.raises(InputFileError,
                         match=re.escape(f"data file {path} is {kind}, not a regular file")):
        _bounded(check)
  for key in ("regular", "link"):
    with files.open_regular(specials[key], "r", encoding="utf-8") as f:
      assert json.loads(f.read()) == {"prompt": "1+1=", "answer": "2"}
    assert files.require_regular(specials[key]) == specials[key]
  with pytest.raises(FileNotFoundError):
    files.open_regular(specials["regular"] + ".missing")
  with pytest.raises(ValueError, match="reads only"):
    files.open_regular(specials["regular"], "w")


def test_every_reader_refuses_a_fifo(specials, tmp_path):
  """Data, config, benchmark, metrics and model-directory readers all refuse a FIFO."""
  from jaxent import apps
  from jaxent import config as C
  from jaxent import eval as E
  from jaxent.train import _logging
  fifo = specials["fifo"]
  with pytest.raises(D.DataError, match="is a FIFO"):
    _bounded(lambda: D.load_prompts(fifo, D.arithmetic.CharTokenizer()))
  with pytest.raises(C.ConfigError, match="config file .* is a FIFO"):
    _bounded(lambda: C.load(fifo))
  with pytest.raises(D.DataError, match="benchmark file .* is a FIFO"):
    _bounded(lambda: E.resolve_fields(fifo, ("prompt",), ("answer",)))
  run = tmp_path / "run"
  run.mkdir()
  _fifo(run / "metrics.jsonl")
  with pytest.raises(InputFileError, match="metrics.jsonl is a FIFO"):
    _bounded(lambda: apps.fit_law(str(run)))
  with pytest.raises(InputFileError, match="metrics.jsonl is a FIFO"):
    _bounded(lambda: _logging.truncate_after(str(run / "metrics.jsonl"), 3))
  model_dir = tmp_path / "model"
  model_dir.mkdir()
  for name in ("config.json", "tokenizer.json"):
    _fifo(model_dir / name)
  with pytest.raises(InputFileError, match="model directory file .*(config|tokenizer).json is a FIFO"):
    _bounded(lambda: models.load_config(model_dir))
  with pytest.raises(InputFileError, match="is a FIFO"):
    _bounded(lambda: models.load_tokenizer(model_dir))


_DRIVER = """
import sys
from jaxent import cli
from jaxent.train import _build
real = _build.arithmetic_files
_build.arithmetic_files = lambda *a, **k: (sys.argv[1], real(*a, **k)[1])
sys.exit(cli.main(["train", sys.argv[2], "--run-dir", sys.argv[3]]))
"""


def _train_cfg(tmp_path, **train):
  cfg = {"name": "hostile", "model": {"arch": TWO_HEAD_ARCH},
         "data": {"task": "arithmetic", "num_operands": 2, "num_digits": 2, "num_eval": 8},
         "rollout": {"prompts_per_step": 2, "samples_per_prompt": 2, "max_new_tokens": 4,
                     "reward": "arithmetic_exact"},
         "train": {"steps": 1, "progress": False, **train}}
  path = tmp_path / "cfg.yaml"
  path.write_text(yaml.safe_dump(cfg))
  return str(path)


def test_cli_train_and_eval_exit_2_on_fifo_inputs(tmp_path):
  """A FIFO as the training data, the config, a benchmark or fit-law's metrics: exit 2, one line."""
  fifo = _fifo(tmp_path / "data.jsonl")
  run_dir = tmp_path / "run"
  p = subprocess.run([sys.executable, "-c", _DRIVER, fifo, _train_cfg(tmp_path), str(run_dir)],
                     capture_output=True, text=True, timeout=120, env=ENV, cwd=ROOT)
  err = [line for line in p.stderr.splitlines() if line.strip()]
  assert p.returncode == 2, p.stderr
  assert err[-1].startswith("jaxent: error: ") and f"{fifo} is a FIFO" in err[-1]
  assert not (run_dir / "checkpoints").exists()
  code, err = _jaxent("train", fifo)
  assert code == 2 and err == [f"jaxent: error: config file {fifo} is a FIFO (named pipe), not a "
                               f"regular file"]
  code, err = _jaxent("eval", str(tmp_path), "--data", fifo)
  assert code == 2 and len(err) == 1 and f"benchmark file {fifo} is a FIFO" in err[0]
  (tmp_path / "fit").mkdir()
  _fifo(tmp_path / "fit" / "metrics.jsonl")
  code, err = _jaxent("fit-law", str(tmp_path / "fit"))
  assert code == 2 and len(err) == 1 and "metrics.jsonl is a FIFO" in err[0]


# ------------------------------------------------------------------------------- huge rows ---

class _CountingTokenizer:
  """One token per character; remembers the longest text it was asked to encode."""

  def __init__(self):
    self.longest = 0

  def encode(self, text, add_special_tokens=True):
    self.longest = max(self.longest, len(text))
    return [ord(c) % 1000 for c in text]


def test_huge_rows_are_skipped_or_cut_before_tokenization(tmp_path):
  L = 16
  bound = D.max_prompt_chars(L)
  assert bound == L * D.MAX_CHARS_PER_TOKEN
  huge = "x" * 5_000_000  # 5 MB
  path = tmp_path / "d.jsonl"
  with open(path, "w") as f:
    f.write(json.dumps({"prompt": "1+1=", "answer": "2"}) + "\n")
    f.write(json.dumps({"prompt": huge, "answer": "1"}) + "\n")
    f.write(json.dumps({"prompt": "y" * (bound + 1), "answer": "1"}) + "\n")
    f.write(json.dumps({"prompt": "2+2=", "answer": "4", "pad": "z" * D.max_line_bytes(L)}) + "\n")
    f.write(json.dumps({"prompt": "3+3=", "answer": "6"}) + "\n")
  tok = _CountingTokenizer()
  t0 = time.monotonic()
  ps = D.load_prompts(str(path), tok, max_prompt_len=L)
  assert time.monotonic() - t0 < 5.0
  assert [e.prompt for e in ps.examples] == ["1+1=", "3+3="]
  assert ps.stats.oversized == 3 and ps.stats.rows == 5 and ps.stats.skipped == 3
  assert tok.longest <= bound  # nothing longer ever reached the tokenizer
  # truncate_left: the huge prompt is cut to its last `bound` characters, then to L tokens
  tok = _CountingTokenizer()
  rows = [{"prompt": "a" * 4_999_990 + "0123456789", "answer": "1"}]
  ps = D.load_prompts(rows, tok, max_prompt_len=L, overlong="truncate_left")
  assert tok.longest == bound and ps.stats.truncated == 1 and ps.stats.oversized == 0
  want = [ord(c) % 1000 for c in ("a" * 6 + "0123456789")]
  assert ps.examples[0].prompt_ids.tolist() == want
  assert ps.examples[0].prompt == rows[0]["prompt"][-bound:]


# --------------------------------------------------------------------------- chat templates ---

def _word_tokenizer(template):
  from tokenizers import Tokenizer
  from tokenizers import models as tm
  from tokenizers import pre_tokenizers
  from transformers import PreTrainedTokenizerFast
  t = Tokenizer(tm.WordLevel({"<unk>": 0, "<s>": 1, "a": 2, "b": 3}, unk_token="<unk>"))
  t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  return PreTrainedTokenizerFast(tokenizer_object=t, unk_token="<unk>", bos_token="<s>",
                                 chat_template=template)


LOOPS = ("{% for i in range(100000) %}{% for j in range(100000) %}{% for k in range(100000) %}"
         "{% endfor %}{% endfor %}{% endfor %}")
BOMB = "{% for i in range(100000) %}{{ messages[0]['content'] * 100 }}{% endfor %}"


@pytest.mark.parametrize("template, needle", [
    (LOOPS, r"did not finish within 2 s \(.*\)"),
    (BOMB, r"produced \d+ characters \(bound \d+\)"),
])
def test_hostile_chat_template_is_refused_within_its_bound(template, needle):
  tok = _word_tokenizer(template)
  rows = [{"prompt": "a b", "answer": "1"}] * 50
  t0 = time.monotonic()
  with pytest.raises(D.DataError, match=f"chat template {needle} on record 0; refusing"):
    _bounded(lambda: D.load_prompts(rows, tok, chat_template=True))
  assert time.monotonic() - t0 < 2.0 + 8.0  # one row's bound, not fifty
  # an ordinary template is unaffected, and the render is exactly transformers'
  ok = _word_tokenizer("{% for m in messages %}{{ m['content'] }} {% endfor %}b")
  ps = D.load_prompts(rows[:1], ok, chat_template=True)
  assert ps.examples[0].prompt_ids.tolist() == [2, 3, 3]
  # a template's own error on a row stays a per-row skip
  raising = _word_tokenizer("{{ raise_exception('no') }}")
  with pytest.raises(D.DataError, match="no valid rows.*tokenize_error"):
    D.load_prompts(rows[:2], raising, chat_template=True)


def test_deadline_never_fires_after_its_block():
  """A deadline whose block finished first leaves no exception pending in the thread."""
  from jaxent.data._template import TemplateTimeout, _Deadline
  for _ in range(50):
    with _Deadline(0.001):
      pass
  time.sleep(0.05)
  total = 0
  for i in range(200_000):  # would raise here if a timeout were still pending
    total += i
  assert total == sum(range(200_000))
  with pytest.raises(TemplateTimeout):
    with _Deadline(0.05):
      while True:
        pass


# ------------------------------------------------------------------------ model directories ---

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  """A tiny Qwen2 directory written by jaxent (config.json + model.safetensors)."""
  d = tmp_path_factory.mktemp("hf") / "tiny"
  arch = {k: v for k, v in TWO_HEAD_ARCH.items()}
  arch["vocab_size"] = 32
  model = models.init_model(models.ModelConfig(**arch), seed=0)
  models.save_pretrained(model, d)
  return d


def _copy(src, dst):
  import shutil
  shutil.copytree(src, dst)
  return dst


def _header(path):
  raw = path.read_bytes()
  (n,) = struct.unpack("<Q", raw[:8])
  return json.loads(raw[8:8 + n]), raw[8 + n:]


def _write(path, header, data):
  h = json.dumps(header).encode()
  path.write_bytes(struct.pack("<Q", len(h)) + h + data)


def _corrupt(model_dir, tmp_path, name, edit):
  d = _copy(model_dir, tmp_path / name)
  st = d / "model.safetensors"
  header, data = _header(st)
  out = edit(header, data)
  if isinstance(out, bytes):
    st.write_bytes(out)
  else:
    _write(st, *out)
  return d


def _tensor(header, name):
  return next(k for k in header if k.endswith(name))


def test_malformed_safetensors_are_refused_naming_file_and_problem(model_dir, tmp_path):
  models.from_pretrained(model_dir)  # the intact directory loads

  def overlap(h, data):
    a, b = _tensor(h, "q_proj.weight"), _tensor(h, "k_proj.weight")
    size = h[b]["data_offsets"][1] - h[b]["data_offsets"][0]
    h[b]["data_offsets"] = [h[a]["data_offsets"][0], h[a]["data_offsets"][0] + size]
    return h, data

  def out_of_range(h, data):
    a = _tensor(h, "q_proj.weight")
    h[a]["data_offsets"] = [len(data), len(data) + 4]
    return h, data

  def wrong_shape(h, data):
    h[_tensor(h, "q_proj.weight")]["shape"][0] += 1
    return h, data

  def int_dtype(h, data):
    h[_tensor(h, "q_proj.weight")]["dtype"] = "I32"
    return h, data

  def gap(h, data):
    del h[_tensor(h, "down_proj.weight")]  # its bytes stay: a hole in the data section
    return h, data

  cases = {
      "huge_header": (lambda h, data: struct.pack("<Q", 1 << 40) + b"{}",
                      r"header length 1099511627776 is beyond the file"),
      "truncated": (lambda h, data: (model_dir / "model.safetensors").read_bytes()[:-100],
                    r"data offsets .* are outside the data section"),
      "tiny": (lambda h, data: b"\x01\x02", r"not a safetensors file \(2 bytes"),
      "not_json": (lambda h, data: struct.pack("<Q", 4) + b"{{{{", r"header is not valid JSON"),
      "overlap": (overlap, r"tensors .* overlap in the data section"),
      "out_of_range": (out_of_range, r"data offsets .* are outside the data section"),
      "wrong_shape": (wrong_shape, r"bytes for shape .* of F32 \(\d+ bytes expected\)"),
      "int_dtype": (int_dtype, r"q_proj.weight' in .* has dtype I32; parameters must be one of"),
      "gap": (gap, r"the tensors cover \d+ of the \d+ bytes of the data section"),
  }
  for name, (edit, needle) in cases.items():
    d = _corrupt(model_dir, tmp_path, name, edit)
    with pytest.raises(ValueError, match=needle) as e:
      models.from_pretrained(d)
    if name != "int_dtype":
      assert str(d / "model.safetensors") in str(e.value), name
  from safetensors.numpy import load_file, save_file
  d = _copy(model_dir, tmp_path / "missing")
  tensors = load_file(str(d / "model.safetensors"))
  del tensors["model.layers.0.mlp.down_proj.weight"]
  save_file(tensors, str(d / "model.safetensors"))
  with pytest.raises(ValueError, match=r"missing tensors \(1\): model.layers.0.mlp.down_proj.weight"):
    models.from_pretrained(d)


def test_non_finite_weights_are_refused(model_dir, tmp_path):
  for bad in (np.nan, np.inf):
    def poison(h, data, bad=bad):
      name = _tensor(h, "up_proj.weight")
      start = h[name]["data_offsets"][0]
      data = bytearray(data)
      data[start + 8:start + 12] = np.float32(bad).tobytes()
      return h, bytes(data)
    d = _corrupt(model_dir, tmp_path, f"poison_{bad}", poison)
    with pytest.raises(ValueError, match=r"tensor 'model.layers.0.mlp.up_proj.weight' in .* holds "
                                         r"NaN or inf values \(layers/up_kernel\)"):
      models.from_pretrained(d)


def test_bad_config_and_index_files_are_refused(model_dir, tmp_path):
  cfg = json.loads((model_dir / "config.json").read_text())
  for name, content, needle in [
      ("list", "[1, 2]", r"config.json: the top level is a JSON list, not an object"),
      ("garbage", "{nope", r"config.json is not valid JSON"),
      ("heads0", json.dumps({**cfg, "num_attention_heads": 0}),
       r"config.json: num_attention_heads must be a positive int, got 0"),
  ]:
    d = _copy(model_dir, tmp_path / name)
    (d / "config.json").write_text(content)
    with pytest.raises(ValueError, match=needle):
      models.load_config(d)
  outside = tmp_path / "outside.safetensors"
  outside.write_bytes((model_dir / "model.safetensors").read_bytes())
  for name, shard in [("dotdot", "../outside.safetensors"), ("abs", str(outside))]:
    d = _copy(model_dir, tmp_path / name)
    os.rename(d / "model.safetensors", d / "shard.safetensors")
    header, _ = _header(d / "shard.safetensors")
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: shard for k in header if k != "__metadata__"}}))
    with pytest.raises(ValueError, match="outside the model directory"):
      models.from_pretrained(d)
  d = _copy(model_dir, tmp_path / "badtok")
  (d / "tokenizer.json").write_text('{"model": {"type": "Nope"}}')
  with pytest.raises(ValueError, match="malformed tokenizer files|tokenizer.json is malformed"):
    models.load_tokenizer(d)
  (d / "tokenizer.json").write_text("[]")
  (d / "tokenizer_config.json").write_text("{nope")
  with pytest.raises(ValueError, match="tokenizer_config.json is not valid JSON"):
    models.load_tokenizer(d)


def test_cli_eval_exit_2_one_line_on_malformed_model_dirs(model_dir, tmp_path):
  bench = tmp_path / "b.jsonl"
  bench.write_text('{"prompt": "1+1=", "answer": "2"}\n')
  d = _corrupt(model_dir, tmp_path, "cli_trunc",
               lambda h, data: (model_dir / "model.safetensors").read_bytes()[:-100])
  code, err = _jaxent("eval", str(d), "--data", str(bench), "--max-new-tokens", "2")
  assert code == 2 and len(err) == 1 and err[0].startswith("jaxent: error: ")
  assert "model.safetensors" in err[0] and "outside the data section" in err[0]
  d = _copy(model_dir, tmp_path / "cli_list")
  (d / "config.json").write_text("[]")
  code, err = _jaxent("eval", str(d), "--data", str(bench))
  assert code == 2 and len(err) == 1 and "config.json: the top level is a JSON list" in err[0]


# ---------------------------------------------------------------------------------- fit-law ---

def _metrics(run_dir, xs, ys, key="accuracy"):
  run_dir.mkdir()
  with open(run_dir / "metrics.jsonl", "w") as f:
    for i, (x, y) in enumerate(zip(xs, ys)):
      f.write(json.dumps({"step": i + 1, "entropy": x, key: y}) + "\n")
  return str(run_dir)


def test_fit_law_on_a_constant_series_exits_2_with_one_line(tmp_path, capsys):
  run = _metrics(tmp_path / "flat", [1.0, 0.8, 0.6, 0.4], [0.25] * 4)
  assert cli.main(["fit-law", run]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert err == [f"jaxent: error: 'accuracy' in {run}/metrics.jsonl is constant over the 4 fitted "
                 f"points (R = 0.25): no entropy-performance trade-off to fit (a would be 0 and "
                 f"r2 undefined)"]
  assert not os.path.exists(os.path.join(run, "law.json"))
  run = _metrics(tmp_path / "flat_h", [0.5] * 4, [0.1, 0.2, 0.3, 0.4])
  assert cli.main(["fit-law", run]) == 2
  err = capsys.readouterr().err
  assert f"'entropy' in {run}/metrics.jsonl is constant" in err and "not identifiable" in err


def test_fit_law_formula_folds_signs(tmp_path, capsys):
  # accuracy rising with entropy: R = +0.5*exp(H) - 0.25 exactly, so a = -0.5, b = -0.25
  hs = [0.1, 0.2, 0.3, 0.4, 0.5]
  run = _metrics(tmp_path / "up", hs, [0.5 * math.exp(h) - 0.25 for h in hs])
  assert cli.main(["fit-law", run]) == 0
  line = capsys.readouterr().out.strip()
  assert line.startswith("accuracy = +0.5*exp(entropy) - 0.25: r2 1.0000"), line
  assert "--" not in line and "nan" not in line


# ------------------------------------------------------------------------- python -m jaxent ---

def test_python_m_jaxent_runs_the_cli():
  p = subprocess.run([sys.executable, "-m", "jaxent", "--help"], capture_output=True, text=True,
                     timeout=60, env=ENV, cwd=ROOT)
  assert p.returncode == 0 and p.stdout.startswith("usage: jaxent")
  assert "fit-law" in p.stdout and "cannot be directly executed" not in p.stderr
  code, err = _jaxent("fit-law", "/nonexistent-run")
  assert code == 2 and err == ["jaxent: error: run directory not found: /nonexistent-run"]
