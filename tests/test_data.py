"""Prompt datasets: validation and counting, tokenization, shuffling, process
sharding, exact resume; the generated arithmetic task and its tokenizer."""
import json
import os

import numpy as np
import pytest

from jaxent import data as D
from jaxent.data import arithmetic as A
from jaxent import rewards as R

TOK = A.CharTokenizer()


def _write_lines(path, lines):
  with open(path, "wb") as f:
    for line in lines:
      f.write(line if isinstance(line, bytes) else line.encode("utf-8"))
      f.write(b"\n")
  return str(path)


def _records(n, start=0):
  return [{"prompt": f"{i}+{i}=", "answer": f"{2 * i}$"} for i in range(start, start + n)]


# --- reading and validation -------------------------------------------------

def test_malformed_rows_are_skipped_and_counted(tmp_path):
  lines = [
      json.dumps({"prompt": "1+2=", "answer": "3$"}),          # 0 valid
      "{not json",                                             # 1 malformed
      "",                                                      # 2 blank: ignored
      json.dumps([1, 2]),                                      # 3 malformed (not an object)
      json.dumps({"answer": "3$"}),                            # 4 missing prompt
      json.dumps({"prompt": "1+2="}),                          # 5 missing answer
      json.dumps({"prompt": 12, "answer": "3$"}),              # 6 wrong type
      json.dumps({"prompt": "1+2=", "answer": ["3"]}),         # 7 wrong type
      json.dumps({"prompt": "   ", "answer": "3$"}),           # 8 empty
      json.dumps({"prompt": "1+2=", "answer": ""}),            # 9 empty
      b'{"prompt": "\xff\xfe", "answer": "1"}',                # 10 invalid UTF-8
      json.dumps({"prompt": "1+2=x", "answer": "3$"}),         # 11 tokenizer raises ('x')
      json.dumps({"prompt": "11+22+33=", "answer": 66}),       # 12 valid, numeric answer
      json.dumps({"prompt": "1111+2222=", "answer": "3333$"}), # 13 overlong (10 > 9)
      json.dumps({"prompt": "4+5=", "answer": "9$", "extra": 1}),  # 14 valid
  ]
  path = _write_lines(tmp_path / "d.jsonl", lines)
  ps = D.load_prompts(path, TOK, max_prompt_len=9)
  assert [e.index for e in ps.examples] == [0, 12, 14]
  assert [e.answer for e in ps.examples] == ["3$", "66", "9$"]
  assert ps.stats == D.DataStats(rows=14, valid=3, malformed=3, missing_field=2,
                                 wrong_type=2, empty=2, tokenize_error=1,
                                 overlong=1, truncated=0)
  assert ps.stats.skipped == 11
  counters = ps.stats.as_dict()
  assert counters["data_skipped"] == 11 and counters["data_malformed"] == 3
  json.dumps(counters)
  np.testing.assert_array_equal(ps.examples[1].prompt_ids, TOK.encode("11+22+33="))
  assert ps.examples[1].prompt_ids.dtype == np.int32
  # truncate_left keeps the overlong row's last 9 tokens
  ps = D.load_prompts(path, TOK, max_prompt_len=9, overlong="truncate_left")
  assert [e.index for e in ps.examples] == [0, 12, 13, 14]
  assert TOK.decode(ps.examples[2].prompt_ids) == "111+2222="
  assert (ps.stats.overlong, ps.stats.truncated, ps.stats.valid) == (0, 1, 4)


def test_field_names_are_configurable_and_files_concatenate(tmp_path):
  a = _write_lines(tmp_path / "a.jsonl", [json.dumps({"q": "1+1=", "a": "2$"}), ""])
  b = _write_lines(tmp_path / "b.jsonl", [json.dumps({"q": "2+2=", "a": "4$"})])
  ps = D.load_prompts([a, b], TOK, prompt_key="q", answer_key="a")
  # indices run on across files: a.jsonl has 2 lines
  assert [(e.index, e.prompt) for e in ps.examples] == [(0, "1+1="), (2, "2+2=")]
  with pytest.raises(D.DataError, match="no valid rows"):
    D.load_prompts([a, b], TOK)  # default field names are missing


def test_bad_sources_raise_data_error_naming_the_file(tmp_path):
  missing = str(tmp_path / "nope.jsonl")
  with pytest.raises(D.DataError, match="not found.*nope.jsonl"):
    D.load_prompts(missing, TOK)
  with pytest.raises(D.DataError, match="directory"):
    D.load_prompts(str(tmp_path), TOK)
  with pytest.raises(D.DataError, match="unsupported.*data.csv"):
    D.load_prompts(_write_lines(tmp_path / "data.csv", ["a,b"]), TOK)
  empty = _write_lines(tmp_path / "empty.jsonl", [])
  with pytest.raises(D.DataError, match="empty.jsonl has no valid rows"):
    D.load_prompts(empty, TOK)
  junk = _write_lines(tmp_path / "junk.jsonl", ["{", "[]", "x"])
  with pytest.raises(D.DataError, match=r"junk.jsonl has no valid rows.*junk.jsonl:1"):
    D.load_prompts(junk, TOK)
  with pytest.raises(D.DataError, match="no valid rows"):
    D.load_prompts([{"prompt": "", "answer": "1"}], TOK)
  bad_pq = tmp_path / "d.parquet"
  bad_pq.write_bytes(b"PAR1")                 # not a Parquet file
  with pytest.raises(D.DataError, match="d.parquet"):
    D.load_prompts(str(bad_pq), TOK)


def test_parquet_rows_equal_the_same_jsonl_rows(tmp_path):
  pa = pytest.importorskip("pyarrow")        # a dependency of jaxent; skipped only if broken
  import pyarrow.parquet as pq
  rows = _records(5) + [{"prompt": "", "answer": "0$"}, {"prompt": "7+7=", "answer": 14}]
  path = tmp_path / "d.parquet"
  pq.write_table(pa.table({"prompt": [r["prompt"] for r in rows],
                           "answer": [str(r["answer"]) for r in rows]}), str(path))
  from_pq = D.load_prompts(str(path), TOK)
  from_jsonl = D.load_prompts(_write_lines(tmp_path / "d.jsonl", [json.dumps(r) for r in rows]), TOK)
  assert [(e.prompt, e.answer, list(e.prompt_ids)) for e in from_pq.examples] == \
      [(e.prompt, e.answer, list(e.prompt_ids)) for e in from_jsonl.examples]
  assert from_pq.stats.empty == 1 and from_pq.stats.valid == 6


def test_argument_errors_name_the_argument():
  recs = _records(4)
  with pytest.raises(ValueError, match="max_prompt_len"):
    D.load_prompts(recs, TOK, max_prompt_len=0)
  with pytest.raises(ValueError, match="overlong"):
    D.load_prompts(recs, TOK, overlong="cut")
  with pytest.raises(ValueError, match="chat template"):
    D.load_prompts(recs, TOK, chat_template=True)
  ps = D.load_prompts(recs, TOK)
  with pytest.raises(ValueError, match="divisible by process_count"):
    D.PromptIterator(ps, prompts_per_step=3, process_count=2)
  with pytest.raises(ValueError, match="process_index"):
    D.PromptIterator(ps, prompts_per_step=4, process_index=2, process_count=2)
  with pytest.raises(ValueError, match="seed"):
    D.PromptIterator(ps, prompts_per_step=4, seed=-1)
  with pytest.raises(ValueError, match="prompts_per_step"):
    D.PromptDataConfig(path="x.jsonl", prompts_per_step=0)
  with pytest.raises(ValueError, match="overlong"):
    D.PromptDataConfig(path="x.jsonl", prompts_per_step=2, overlong="left")


def test_chat_template_and_special_tokens():
  from tokenizers import Tokenizer, models, pre_tokenizers, processors
  from transformers import PreTrainedTokenizerFast
  words = ["<unk>", "<s>", "<|user|>", "<|system|>", "<|assistant|>", "<|end|>",
           "what", "is", "2+2", "?", "be", "brief"]
  vocab = {w: i for i, w in enumerate(words)}
  t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  t.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
  template = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> "
              "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
  tok = PreTrainedTokenizerFast(tokenizer_object=t, unk_token="<unk>", bos_token="<s>",
                                chat_template=template)
  recs = [{"prompt": "what is 2+2 ?", "answer": "4"}]
  plain = D.load_prompts(recs, tok)
  # plain: the tokenizer's own special tokens (BOS) are added
  assert plain.examples[0].prompt_ids.tolist() == [1, 6, 7, 8, 9]
  chat = D.load_prompts(recs, tok, chat_template=True)
  # <|user|> what is 2+2 ? <|end|> <|assistant|>, no second BOS
  assert chat.examples[0].prompt_ids.tolist() == [2, 6, 7, 8, 9, 5, 4]
  sys_ = D.load_prompts(recs, tok, chat_template=True, system_prompt="be brief")
  assert sys_.examples[0].prompt_ids.tolist() == [3, 10, 11, 5, 2, 6, 7, 8, 9, 5, 4]
  assert chat.examples[0].prompt == "what is 2+2 ?"  # raw text kept
  # overlong with the template counted: 7 tokens > 6
  with pytest.raises(D.DataError, match="overlong"):
    D.load_prompts(recs, tok, chat_template=True, max_prompt_len=6)


# --- iteration ---------------------------------------------------------------

def _take(it, n):
  return [next(it) for _ in range(n)]


def _flat(batches):
  return [i for b in batches for i in b.indices]


def test_epochs_are_fresh_permutations_deterministic_in_seed():
  n, g = 24, 6
  ps = D.load_prompts(_records(n), TOK)
  it = D.PromptIterator(ps, prompts_per_step=g, seed=7)
  batches = _take(it, 3 * n // g)
  order = _flat(batches)
  epochs = [order[k * n:(k + 1) * n] for k in range(3)]
  for e in epochs:
    assert sorted(e) == list(range(n))  # every example exactly once per epoch
  assert epochs[0] != epochs[1] and epochs[1] != epochs[2]
  assert epochs[0] != list(range(n))
  assert [b.step for b in batches] == list(range(len(batches)))
  b = batches[0]
  assert len(b) == g and len(b.prompt_ids) == len(b.answers) == len(b.prompts) == g
  for ids, prompt, ans, idx in zip(b.prompt_ids, b.prompts, b.answers, b.indices):
    assert isinstance(ids, list) and all(type(t) is int for t in ids)
    assert TOK.decode(ids) == prompt == f"{idx}+{idx}=" and ans == f"{2 * idx}$"
  # same seed: same stream; another seed: another
  assert _flat(_take(D.PromptIterator(ps, prompts_per_step=g, seed=7), 12)) == order
  assert _flat(_take(D.PromptIterator(ps, prompts_per_step=g, seed=8), 4)) != order[:24]
  # no shuffle: file order, repeated
  plain = _flat(_take(D.PromptIterator(ps, prompts_per_step=g, shuffle=False), 8))
  assert plain == list(range(n)) * 2


def test_process_shards_are_disjoint_and_assemble_the_global_batch():
  n, g = 30, 8  # n not a multiple of g: batches straddle epochs
  ps = D.load_prompts(_records(n), TOK)
  single = _take(D.PromptIterator(ps, prompts_per_step=g, seed=3), 10)
  for p_count in (2, 4):
    its = [D.PromptIterator(ps, prompts_per_step=g, seed=3, process_index=p,
                            process_count=p_count) for p in range(p_count)]
    for step in range(10):
      parts = [next(it) for it in its]
      assert all(len(b) == g // p_count for b in parts)
      assembled = [i for b in parts for i in b.indices]
      assert assembled == single[step].indices
      assert sum(len(set(b.indices)) for b in parts) == len(set(assembled))
  # within the first epoch (first 3 global batches: 24 < 30 rows) the two
  # processes see disjoint examples
  its = [D.PromptIterator(ps, prompts_per_step=g, seed=3, process_index=p,
                          process_count=2) for p in range(2)]
  seen = [set(_flat(_take(it, 3))) for it in its]
  assert not seen[0] & seen[1] and len(seen[0]) == len(seen[1]) == 12


def test_state_resumes_exactly_even_across_process_counts():
  n, g = 20, 4
  ps = D.load_prompts(_records(n), TOK)
  it = D.PromptIterator(ps, prompts_per_step=g, seed=11)
  _take(it, 7)  # into the second epoch
  state = json.loads(json.dumps(it.get_state()))  # through a checkpoint file
  expected = _take(it, 9)
  resumed = D.PromptIterator(ps, prompts_per_step=g, seed=11)
  resumed.set_state(state)
  got = _take(resumed, 9)
  assert [b.indices for b in got] == [b.indices for b in expected]
  assert [b.step for b in got] == list(range(7, 16))
  # the same state resumes a 2-process run with the same global stream
  halves = [D.PromptIterator(ps, prompts_per_step=g, seed=11, process_index=p,
                             process_count=2) for p in range(2)]
  for h in halves:
    h.set_state(state)
  for step in range(9):
    assert next(halves[0]).indices + next(halves[1]).indices == expected[step].indices
  # a state from another seed, batch size or dataset is refused
  for other in (D.PromptIterator(ps, prompts_per_step=g, seed=12),
                D.PromptIterator(ps, prompts_per_step=2 * g, seed=11),
                D.PromptIterator(D.load_prompts(_records(n, start=1), TOK),
                                 prompts_per_step=g, seed=11)):
    with pytest.raises(ValueError, match="does not match"):
      other.set_state(state)


def test_finite_epochs_stop_with_equal_counts_per_process():
  n, g = 10, 4
  ps = D.load_prompts(_records(n), TOK)
  its = [D.PromptIterator(ps, prompts_per_step=g, seed=0, num_epochs=3,
                          process_index=p, process_count=2) for p in range(2)]
  counts = [len(list(it)) for it in its]
  assert counts == [3 * n // g] * 2 == [its[0].num_steps] * 2


def test_make_prompt_iterator_from_config(tmp_path):
  task = A.ArithmeticTask()
  path = task.write_jsonl(tmp_path / "train.jsonl", 64, seed=0)
  cfg = D.PromptDataConfig(path=path, prompts_per_step=16, max_prompt_len=task.prompt_len,
                           seed=5)
  it = D.make_prompt_iterator(cfg, TOK, process_index=1, process_count=2)
  b = next(it)
  assert len(b) == 8 and it.stats.valid == 64 and it.steps_per_epoch == 4.0
  recs = [json.loads(l) for l in open(path)]
  for ids, ans, idx in zip(b.prompt_ids, b.answers, b.indices):
    assert TOK.decode(ids) == recs[idx]["prompt"] and ans == recs[idx]["answer"]


def test_write_jsonl_is_atomic(tmp_path, monkeypatch):
  task = A.ArithmeticTask()
  path = task.write_jsonl(tmp_path / "train.jsonl", 8, seed=0)
  before = open(path).read()
  good = task.examples(8, seed=1)

  def broken(*a, **kw):           # dies after two rows, as a full disk would
    yield from good[:2]
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(A.ArithmeticTask, "examples", broken)
  with pytest.raises(OSError):
    task.write_jsonl(path, 8, seed=1)
  assert open(path).read() == before                      # the old file, whole
  assert sorted(os.listdir(tmp_path)) == ["train.jsonl"]  # no temporary left behind


# --- the arithmetic task -----------------------------------------------------

def test_arithmetic_examples_are_correct_and_deterministic():
  task = A.ArithmeticTask(num_operands=3, num_digits=2)
  assert task.prompt([12, 34, 56]) == "12+34+56=" and task.answer([12, 34, 56]) == "46;102$"
  recs = task.examples(500, seed=1)
  assert recs == task.examples(500, seed=1)
  assert recs != task.examples(500, seed=2)
  assert len({r["prompt"] for r in recs}) == 500
  for r in recs:
    ops = [int(x) for x in r["prompt"][:-1].split("+")]
    assert len(ops) == 3 and all(10 <= x <= 99 for x in ops)
    assert r["answer"] == f"{ops[0] + ops[1]};{ops[0] + ops[1] + ops[2]}$"
    assert len(r["prompt"]) == task.prompt_len and len(r["answer"]) <= task.max_answer_len
  four = A.ArithmeticTask(num_operands=4, num_digits=1)
  for r in four.examples(50, seed=0):
    ops = [int(x) for x in r["prompt"][:-1].split("+")]
    assert r["answer"] == ";".join(str(sum(ops[:k])) for k in range(2, 5)) + "$"
  assert four.max_answer_len == len("18;27;36$")


def test_arithmetic_splits_are_disjoint_with_the_asked_share():
  task = A.ArithmeticTask(heldout_fraction=0.05)
  train = {r["prompt"] for r in task.examples(20_000, seed=0)}
  held = {r["prompt"] for r in task.examples(2048, seed=0, split="heldout")}
  assert len(held) == 2048 and not train & held
  held_other_seed = {r["prompt"] for r in task.examples(2048, seed=9, split="heldout")}
  assert not train & held_other_seed
  # the hash split holds ~5% of all problems (binomial sd 0.0007 at n=1e5)
  rng = np.random.default_rng(0)
  ops = rng.integers(10, 100, size=(100_000, 3))
  assert abs(task.is_heldout(ops).mean() - 0.05) < 0.004
  with pytest.raises(ValueError, match="split"):
    task.examples(1, seed=0, split="test")
  with pytest.raises(ValueError, match="unique"):
    A.ArithmeticTask(num_operands=2, num_digits=1).examples(200, seed=0)


def test_char_tokenizer():
  assert TOK.vocab_size == len(TOK) == 15
  assert (TOK.pad_token_id, TOK.eos_token_id) == (TOK.pad_id, TOK.eos_id) == (0, 14)
  ids = TOK.encode("12+34=46;102$")
  assert ids == [2, 3, 11, 4, 5, 12, 5, 7, 13, 2, 1, 3, 14]
  assert TOK.decode(ids) == "12+34=46;102$"
  assert TOK.decode(np.array(ids + [0, 0])) == "12+34=46;102$__"
  assert TOK.decode(ids + [0, 0], skip_special_tokens=True) == "12+34=46;102"
  assert TOK.batch_decode([[2], [3, 14]]) == ["1", "2$"]
  assert TOK("1+1=")["input_ids"] == [2, 11, 2, 12]
  with pytest.raises(ValueError, match="'x'"):
    TOK.encode("1x")
  with pytest.raises(ValueError, match="outside"):
    TOK.decode([15])
  # a correct answer, tokenized and decoded as the sampler would, grades 1
  task = A.ArithmeticTask()
  recs = task.examples(8, seed=3, split="heldout")
  responses = [TOK.decode(TOK.encode(r["answer"]) + [0, 0]) for r in recs]
  res = R.grade_batch("arithmetic_exact", responses, [r["answer"] for r in recs])
  assert res.rewards.tolist() == [1.0] * 8
