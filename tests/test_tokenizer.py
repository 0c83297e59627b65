"""models.load_tokenizer against ``tokenizers.Tokenizer.from_file`` on local tokenizers.

The reference is the ``tokenizers`` library reading the same tokenizer.json.
Before the fix, ``load_tokenizer`` was ``AutoTokenizer``, which in
transformers 5 builds ``Qwen2Tokenizer`` for a ``model_type: qwen2``
directory (and ``LlamaTokenizer`` when tokenizer_config.json names it):
those rebuild the tokenizer with byte-level / metaspace pre-tokenizers and
decoders, so the word-level tokenizer below encoded "the cat sat" as one
unknown token and decoded without spaces.
"""
import io
import json
import os

import pytest
import tokenizers
from tokenizers import decoders, normalizers, pre_tokenizers, processors

from jaxent import data, models
from jaxent.models._hf import _check_tokenizer_json

# Qwen2.5's tokenizer.json pre-tokenizer regex.
QWEN_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
              r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                 "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
                 "{% endif %}")
# Unicode (composed, decomposed "e\u0301", CJK, emoji, ligature), digits,
# runs of spaces, leading/trailing space, newlines, tabs, special tokens.
STRINGS = [
    "the cat sat on the mat .",
    "a dog , 12 3 . the unknownword",
    "Hello  world\n\n 123 456 7890",
    "  leading and trailing  ",
    "naïve café cafe\u0301 über straße 日本語 🙂 ﬁ",
    "x = y + 2\n\treturn x\r\n",
    "<|im_start|>user\nthe cat<|im_end|>\n<think> 3+4=7",
    "",
]


def _word_level():
  """A word-level vocabulary over whitespace/punctuation splits (no decoder)."""
  words = ("<unk> <pad> </s> the cat sat on mat a dog 12 3 . , Hello world 123 x = y + 2 "
           "return leading and trailing naïve café über straße 日本語 user").split()
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(
      {w: i for i, w in enumerate(words)}, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Sequence(
      [pre_tokenizers.Whitespace(), pre_tokenizers.Digits(individual_digits=False)])
  return tok


def _qwen_like():
  """Byte-level BPE with Qwen2.5's structure: NFC, Split(regex) + ByteLevel."""
  tok = tokenizers.Tokenizer(tokenizers.models.BPE(
      unk_token=None, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False,
      byte_fallback=False))
  tok.normalizer = normalizers.NFC()
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(tokenizers.Regex(QWEN_REGEX), behavior="isolated", invert=False),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  tok.decoder = decoders.ByteLevel()
  tok.post_processor = processors.ByteLevel(trim_offsets=False)
  trainer = tokenizers.trainers.BpeTrainer(
      vocab_size=420, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
      special_tokens=SPECIALS, show_progress=False)
  tok.train_from_iterator(["The cat sat on the mat.", "Hello world 123 456",
                           "naïve café über straße 日本語", "x = y + 2\n  return x"] * 4, trainer)
  tok.add_tokens(["<think>"])  # a user-added, non-special token
  return tok


TOKENIZERS = {"word": _word_level, "bpe": _qwen_like}
# What real checkpoints declare: tokenizer_class is what routed AutoTokenizer
# to the model-specific classes.
TOKENIZER_CLASS = {"qwen2": "Qwen2Tokenizer", "llama": "LlamaTokenizerFast"}


def _write(path, tok, model_type, tokenizer_config):
  os.makedirs(path, exist_ok=True)
  tok.save(str(path / "tokenizer.json"))
  (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
  (path / "config.json").write_text(json.dumps({"model_type": model_type}))
  return path


def _assert_same(tok, ref):
  """``tok`` (transformers) encodes and decodes every string as ``ref`` does."""
  for s in STRINGS:
    for special in (False, True):
      want = ref.encode(s, add_special_tokens=special).ids
      assert tok.encode(s, add_special_tokens=special) == want, (s, special)
    ids = ref.encode(s).ids
    for skip in (False, True):
      assert tok.decode(ids, skip_special_tokens=skip) == ref.decode(
          ids, skip_special_tokens=skip), (s, skip)
  assert tok(STRINGS)["input_ids"] == [e.ids for e in ref.encode_batch(STRINGS)]


@pytest.mark.parametrize("model_type", ["qwen2", "llama"])
@pytest.mark.parametrize("kind", sorted(TOKENIZERS))
def test_matches_tokenizer_json(tmp_path, kind, model_type):
  path = _write(tmp_path, TOKENIZERS[kind](), model_type,
                {"tokenizer_class": TOKENIZER_CLASS[model_type]})
  ref = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
  tok = models.load_tokenizer(path)
  _assert_same(tok, ref)
  # No special token invented: the files name none (Qwen2Tokenizer made
  # "<|endoftext|>" the eos/pad, adding it to the word-level vocabulary).
  assert len(tok) == ref.get_vocab_size()
  assert tok.eos_token is None and tok.pad_token is None and tok.bos_token is None
  if kind == "word":  # the words and their spaces survive the round trip
    assert tok.decode(tok.encode("the cat sat on the mat")) == "the cat sat on the mat"


def test_special_tokens_chat_template_and_save_round_trip(tmp_path):
  bpe = _qwen_like()
  extra = bpe.get_vocab_size()  # the id of "<tool>", the next one
  config = {
      "tokenizer_class": "Qwen2Tokenizer", "eos_token": "<|im_end|>",
      "pad_token": "<|endoftext|>", "bos_token": None, "padding_side": "left",
      "chat_template": CHAT_TEMPLATE, "model_max_length": 4096,
      # A special token the config adds beyond tokenizer.json.
      "added_tokens_decoder": {str(extra): {"content": "<tool>", "special": True, "lstrip": False,
                                       "rstrip": False, "normalized": False,
                                       "single_word": False}},
  }
  path = _write(tmp_path / "a", bpe, "qwen2", config)
  ref = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
  tok = models.load_tokenizer(path)
  assert tok.eos_token_id == ref.token_to_id("<|im_end|>")
  assert tok.pad_token_id == ref.token_to_id("<|endoftext|>")
  assert tok.bos_token is None and tok.padding_side == "left"
  assert tok.model_max_length == 4096
  assert tok.convert_tokens_to_ids("<tool>") == extra
  assert tok.encode("a<tool>b", add_special_tokens=False) == (
      ref.encode("a", add_special_tokens=False).ids + [extra]
      + ref.encode("b", add_special_tokens=False).ids)
  assert tok.decode([extra, ref.token_to_id("<|im_end|>")], skip_special_tokens=True) == ""

  messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2 + 3?"}]
  text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
  assert text == ("<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\n2 + 3?<|im_end|>\n"
                  "<|im_start|>assistant\n")
  want = ref.encode(text, add_special_tokens=False).ids
  assert want.count(ref.token_to_id("<|im_start|>")) == 3  # specials are single ids
  assert data.tokenize_prompt(tok, "2 + 3?", chat_template=True,
                              system_prompt="be brief") == want

  # What models.save_pretrained writes (transformers 5 puts the template in
  # chat_template.jinja) loads back the same.
  out = tmp_path / "b"
  tok.save_pretrained(out)
  (out / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
  back = models.load_tokenizer(out)
  _assert_same(back, tokenizers.Tokenizer.from_file(str(out / "tokenizer.json")))
  assert back.encode(text, add_special_tokens=False) == want
  assert back.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == text
  assert (back.eos_token_id, back.pad_token_id, back.padding_side) == (
      tok.eos_token_id, tok.pad_token_id, "left")
  assert back.convert_tokens_to_ids("<tool>") == extra


def test_sentencepiece_only_directory(tmp_path):
  """tokenizer.model without tokenizer.json still loads (AutoTokenizer's conversion)."""
  spm = pytest.importorskip("sentencepiece")
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(["The cat sat on the mat.", "Hello world 123 456",
                              "naïve café über straße", "a dog and a cat"] * 20),
      model_writer=model, vocab_size=340, model_type="bpe", byte_fallback=True,
      character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
  (tmp_path / "tokenizer.model").write_bytes(model.getvalue())
  (tmp_path / "tokenizer_config.json").write_text(json.dumps(
      {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
       "unk_token": "<unk>", "add_bos_token": True}))
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
  sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
  tok = models.load_tokenizer(tmp_path)
  assert (tok.bos_token_id, tok.eos_token_id) == (1, 2)
  # Single-spaced text: sentencepiece's nmt_nfkc also collapses whitespace runs.
  for s in ["The cat sat", "Hello world 12", "naïve 日本 straße"]:
    assert tok.encode(s) == [1] + sp.encode(s)
    assert tok.decode(tok.encode(s), skip_special_tokens=True) == sp.decode(sp.encode(s))


def test_check_names_what_differs(tmp_path):
  path = str(_write(tmp_path, _qwen_like(), "qwen2", {}) / "tokenizer.json")
  _check_tokenizer_json(tokenizers.Tokenizer.from_file(path), path)  # itself: no error
  bad = tokenizers.Tokenizer.from_file(path)
  bad.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
  with pytest.raises(ValueError, match="pre_tokenizer differs"):
    _check_tokenizer_json(bad, path)
  # "<think>" at V + 1 instead of V.
  v = tokenizers.Tokenizer.from_file(path).token_to_id("<think>")
  raw = json.loads(open(path).read())
  raw["added_tokens"] = [t for t in raw["added_tokens"] if t["content"] != "<think>"]
  bad = tokenizers.Tokenizer.from_str(json.dumps(raw))
  bad.add_tokens(["<other>", "<think>"])
  with pytest.raises(ValueError, match=rf"changed id.*'<think>': \({v}, {v + 1}\)"):
    _check_tokenizer_json(bad, path)
  bad = tokenizers.Tokenizer.from_file(path)
  bad.normalizer = None
  with pytest.raises(ValueError, match="normalizer differs"):
    _check_tokenizer_json(bad, path)
  bad = tokenizers.Tokenizer.from_file(path)
  bad.model = tokenizers.models.WordLevel({"<unk>": 0}, unk_token="<unk>")
  with pytest.raises(ValueError, match=r"model \(WordLevel, 1 tokens\) differs .*\(BPE"):
    _check_tokenizer_json(bad, path)
