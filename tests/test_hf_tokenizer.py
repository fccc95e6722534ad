"""Hugging Face tokenizers: same ids as transformers, through checkpoints, run directories and
export. Every tokenizer is built here; nothing is downloaded."""

import io
import json

import pytest
import sentencepiece as spm
import tokenizers
import transformers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from conftest import stdlib_texts, tiny_config
from llm_jax import cli
from llm_jax.data import hf_tokenizer
from llm_jax.data.tokenizer import (SentencePieceTokenizer, for_run, load_tokenizer,
                                    saved_tokenizer, tokenizer_from_bytes)
from llm_jax.errors import UserError
from llm_jax.inference.run import load_run
from llm_jax.train.loop import train

TEXTS = ["Hello world", "  two leading spaces", " one", "line one\nline two\n\n",
         "\ttab\tseparated\t", "accents: élève, façade, naïve, Ångström",
         "CJK: 日本語の文章と中文", "emoji: 🎉🙂👩‍🔬 done", "mixed  \n\t 日本 🎉 é",
         stdlib_texts(41)[-1][:3000]]
# Special tokens split the text; Llama's "first" dummy prefix then differs from "always".
SPECIAL_TEXT = "one</s>two <s> three<|end|> four"
TEMPLATE = "{% for m in messages %}<|start|>{{ m['content'] }}<|end|>{% endfor %}"


def _auto(directory):
  return transformers.AutoTokenizer.from_pretrained(str(directory))


def _auto_ids(auto, text):
  return auto(text, add_special_tokens=False).input_ids


@pytest.fixture(scope="module")
def byte_level_dir(tmp_path_factory):
  """A Llama 3 style tokenizer: byte-level BPE saved by transformers."""
  bpe = tokenizers.Tokenizer(models.BPE())
  bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  bpe.decoder = decoders.ByteLevel()
  bpe.post_processor = processors.ByteLevel(trim_offsets=False)
  bpe.enable_truncation(max_length=8)  # saved in tokenizer.json; transformers ignores it
  bpe.train_from_iterator(stdlib_texts(40), trainers.BpeTrainer(
      vocab_size=700, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
      special_tokens=["<|begin|>", "<|end|>", "<|pad|>", "<|start|>"]))
  directory = tmp_path_factory.mktemp("byte_level")
  transformers.PreTrainedTokenizerFast(
      tokenizer_object=bpe, bos_token="<|begin|>", eos_token="<|end|>", pad_token="<|pad|>",
      chat_template=TEMPLATE).save_pretrained(directory)
  return directory


def _llama2_model() -> bytes:
  """A SentencePiece model as Llama 2's: BPE, byte fallback, a dummy prefix, no pad."""
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(stdlib_texts(40)), model_writer=model, model_type="bpe",
      vocab_size=600, byte_fallback=True, normalization_rule_name="identity",
      remove_extra_whitespaces=False, split_digits=True, max_sentence_length=1 << 20,
      unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
  return model.getvalue()


@pytest.fixture(scope="module")
def sentencepiece_dir(tmp_path_factory):
  """A Llama 2 style directory with only tokenizer.model; special tokens as AddedToken dicts."""
  directory = tmp_path_factory.mktemp("sentencepiece")
  (directory / "tokenizer.model").write_bytes(_llama2_model())
  (directory / "tokenizer_config.json").write_text(json.dumps({
      "tokenizer_class": "LlamaTokenizer", "legacy": False, "chat_template": TEMPLATE,
      "bos_token": {"__type": "AddedToken", "content": "<s>", "normalized": False},
      "eos_token": {"__type": "AddedToken", "content": "</s>", "normalized": False},
      "unk_token": "<unk>"}))
  (directory / "config.json").write_text(json.dumps({"model_type": "llama"}))
  return directory


@pytest.fixture(scope="module")
def llama_json_dir(sentencepiece_dir, tmp_path_factory):
  """The same tokenizer as transformers saves it: tokenizer.json, class LlamaTokenizer."""
  directory = tmp_path_factory.mktemp("llama_json")
  _auto(sentencepiece_dir).save_pretrained(directory)
  (directory / "config.json").write_text(json.dumps({"model_type": "llama"}))
  return directory


def _legacy_json_dir(tmp_path_factory, model_type):
  """A tokenizer.json whose own normaliser prepends the dummy prefix (as Llama 2's and
  Mistral's do), declared LlamaTokenizer: transformers rebuilds it for a llama model only."""
  directory = tmp_path_factory.mktemp(f"legacy_{model_type}")
  (directory / "tokenizer.json").write_text(hf_tokenizer.sentencepiece_json(_llama2_model(), "x"))
  (directory / "tokenizer_config.json").write_text(json.dumps({
      "tokenizer_class": "LlamaTokenizerFast", "legacy": True, "bos_token": "<s>",
      "eos_token": "</s>", "unk_token": "<unk>"}))
  (directory / "config.json").write_text(json.dumps({"model_type": model_type}))
  return directory


@pytest.fixture(scope="module")
def legacy_llama_dir(tmp_path_factory):
  return _legacy_json_dir(tmp_path_factory, "llama")


@pytest.fixture(scope="module")
def legacy_mistral_dir(tmp_path_factory):
  return _legacy_json_dir(tmp_path_factory, "mistral")


@pytest.fixture(params=["byte_level_dir", "sentencepiece_dir", "llama_json_dir",
                        "legacy_llama_dir", "legacy_mistral_dir"])
def hf_dir(request):
  return request.getfixturevalue(request.param)


def test_encode_and_decode_equal_transformers(hf_dir):
  ours, auto = hf_tokenizer.load_hf_tokenizer(hf_dir), _auto(hf_dir)
  for text in TEXTS + [SPECIAL_TEXT]:
    ids = ours.encode(text)
    assert ids == _auto_ids(auto, text), text
    assert ours.decode(ids) == auto.decode(ids)


def test_byte_level_decode_inverts_encode(byte_level_dir):
  ours = hf_tokenizer.load_hf_tokenizer(byte_level_dir)
  for text in TEXTS + ["<|start|>hi<|end|>"]:
    assert ours.decode(ours.encode(text)) == text
  assert ours.encode("<|start|>hi<|end|>")[0] == ours.encode("<|start|>")[0]


def test_special_ids_size_and_template_equal_transformers(hf_dir):
  ours, auto = hf_tokenizer.load_hf_tokenizer(hf_dir), _auto(hf_dir)
  assert (ours.bos_id, ours.eos_id, ours.pad_id) == (
      auto.bos_token_id, auto.eos_token_id, auto.pad_token_id)
  assert ours.vocab_size == len(auto)
  assert ours.chat_template == auto.chat_template
  assert ours.id_to_piece(ours.eos_id) == auto.eos_token


def test_pad_id_is_none_without_a_pad_token(sentencepiece_dir, byte_level_dir):
  assert hf_tokenizer.load_hf_tokenizer(sentencepiece_dir).pad_id is None
  assert hf_tokenizer.load_hf_tokenizer(byte_level_dir).pad_id is not None


def test_bytes_and_run_directory_rebuild_the_same_tokenizer(hf_dir, tmp_path):
  ours = hf_tokenizer.load_hf_tokenizer(hf_dir)
  for copy in (tokenizer_from_bytes(ours.to_bytes()), _saved(ours, tmp_path / "run")):
    assert copy.to_bytes() == ours.to_bytes()
    assert [copy.encode(t) for t in TEXTS] == [ours.encode(t) for t in TEXTS]
    assert (copy.bos_id, copy.eos_id, copy.pad_id, copy.chat_template) == (
        ours.bos_id, ours.eos_id, ours.pad_id, ours.chat_template)


def _saved(tokenizer, workdir):
  workdir.mkdir()
  tokenizer.save(workdir)
  assert sorted(p.name for p in workdir.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
  return saved_tokenizer(workdir)


def test_sentencepiece_bytes_are_the_bare_model_older_checkpoints_hold(tokenizer, tmp_path):
  assert tokenizer.to_bytes() == tokenizer.model_proto
  old = tokenizer_from_bytes(tokenizer.model_proto)
  assert isinstance(old, SentencePieceTokenizer)
  assert [old.encode(t) for t in TEXTS] == [tokenizer.encode(t) for t in TEXTS]
  tokenizer.save(tmp_path)  # a run directory keeps its tokenizer.model
  assert (tmp_path / "tokenizer.model").read_bytes() == tokenizer.model_proto
  assert saved_tokenizer(tmp_path).to_bytes() == tokenizer.model_proto


def _export(tokenizer, out_dir, model_type="llama"):
  """What an HF export holds: the tokenizer files and the model's config.json."""
  tokenizer.export_hf(out_dir)
  (out_dir / "config.json").write_text(json.dumps({"model_type": model_type}))
  return _auto(out_dir)


def test_export_of_an_imported_tokenizer_encodes_as_the_original(hf_dir, tmp_path):
  ours = hf_tokenizer.load_hf_tokenizer(hf_dir)
  model_type = json.loads((hf_dir / "config.json").read_text())["model_type"] \
      if (hf_dir / "config.json").exists() else "llama"
  exported, original = _export(ours, tmp_path, model_type), _auto(hf_dir)
  for text in TEXTS + [SPECIAL_TEXT]:
    assert _auto_ids(exported, text) == _auto_ids(original, text) == ours.encode(text), text
  assert exported.chat_template == ours.chat_template
  assert (exported.bos_token_id, exported.eos_token_id) == (ours.bos_id, ours.eos_id)


def test_export_of_our_sentencepiece_tokenizer_encodes_as_sentencepiece(tokenizer, tmp_path):
  exported = _export(tokenizer, tmp_path)
  texts = TEXTS + stdlib_texts(60)[40:] + [
      "<|im_start|>user<|im_sep|>bonjour 👋<|im_end|>", "a<|im_end|>b", "  <|im_sep|>  x"]
  for text in texts:
    ids = tokenizer.encode(text)
    assert _auto_ids(exported, text) == ids, text[:80]
    assert exported.decode(ids) == tokenizer.decode(ids) == text
  assert (exported.bos_token_id, exported.eos_token_id, exported.pad_token_id) == (
      tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id)
  assert exported("x").input_ids[0] == tokenizer.bos_id  # starts documents as training did
  assert load_tokenizer(tmp_path).encode(texts[0]) == tokenizer.encode(texts[0])


def _copy(directory, to, **config_changes):
  """`directory`'s tokenizer.json and tokenizer_config.json, the latter with changes
  (a value of None drops the key)."""
  (to / "tokenizer.json").write_bytes((directory / "tokenizer.json").read_bytes())
  config = {**json.loads((directory / "tokenizer_config.json").read_text()), **config_changes}
  (to / "tokenizer_config.json").write_text(
      json.dumps({key: value for key, value in config.items() if value is not None}))
  return to


def test_special_tokens_named_only_in_the_config_are_whole_tokens(byte_level_dir, tmp_path):
  plain = hf_tokenizer.load_hf_tokenizer(byte_level_dir)
  assert len(plain.encode("def")) == 1  # a token of the vocabulary, not yet an added one
  _copy(byte_level_dir, tmp_path, extra_special_tokens=["def"])
  ours, auto = hf_tokenizer.load_hf_tokenizer(tmp_path), _auto(tmp_path)
  text = "undefined, redefined: def f(): pass"
  assert ours.encode(text) == _auto_ids(auto, text) != plain.encode(text)


def test_special_tokens_come_from_the_map_and_config_json(byte_level_dir, tmp_path):
  _copy(byte_level_dir, tmp_path, bos_token=None, eos_token=None, pad_token=None,
        chat_template=[{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}])
  (tmp_path / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<|pad|>"}))
  (tmp_path / "config.json").write_text(json.dumps({"bos_token_id": 3, "eos_token_id": [1, 2]}))
  ours = hf_tokenizer.load_hf_tokenizer(tmp_path)
  assert (ours.bos_id, ours.eos_id, ours.pad_id, ours.chat_template) == (3, 2, None, "D")
  (tmp_path / "special_tokens_map.json").unlink()
  assert hf_tokenizer.load_hf_tokenizer(tmp_path).eos_id == 1  # the first of config.json's


@pytest.mark.parametrize("files, words", [
    ({}, "has neither tokenizer.json nor tokenizer.model"),
    ({"tokenizer_config.json": "{not json"}, "tokenizer_config.json is not valid JSON"),
    ({"tokenizer.json": "{}"}, "tokenizer.json of"),
    ({"tokenizer_config.json": '{"eos_token": "<never>"}'}, "'<never>', which its tokenizer"),
    ({"tokenizer_config.json": '{"eos_token": "<|end|>"}'}, "names no bos_token"),
    ({"tokenizer.json": None, "tokenizer.model": "junk"}, "tokenizer.model is not a SentencePiece"),
])
def test_bad_directories_are_one_sentence(byte_level_dir, tmp_path, files, words):
  if files:
    _copy(byte_level_dir, tmp_path)
  for name, text in files.items():
    if text is None:
      (tmp_path / name).unlink()
    else:
      (tmp_path / name).write_text(text)
  with pytest.raises(UserError) as error:
    hf_tokenizer.load_hf_tokenizer(tmp_path)
  message = str(error.value)
  assert words in message and "\n" not in message and message.endswith(".")


def test_a_run_keeps_its_hf_tokenizer(byte_level_dir, tmp_path):
  config = tiny_config("model.vocab_size=700", f"data.tokenizer={byte_level_dir}")
  workdir = tmp_path / "run"
  first = for_run(config, [], workdir)
  assert (workdir / "tokenizer.json").exists() and not (workdir / "tokenizer.model").exists()
  assert for_run(config, [], workdir).to_bytes() == first.to_bytes()  # a resume
  config.data.tokenizer = str(byte_level_dir / "tokenizer.json")
  assert for_run(config, [], workdir).to_bytes() == first.to_bytes()
  inherited = for_run(tiny_config("model.vocab_size=700"), [], tmp_path / "next",
                      inherited=first.to_bytes())
  assert inherited.to_bytes() == first.to_bytes()


def test_a_run_refuses_another_tokenizer(byte_level_dir, tokenizer, tmp_path):
  workdir = tmp_path / "run"
  for_run(tiny_config("model.vocab_size=700", f"data.tokenizer={byte_level_dir}"), [], workdir)
  other = tmp_path / "other.model"
  tokenizer.save(other)
  with pytest.raises(UserError, match="differs from the tokenizer already in"):
    for_run(tiny_config(f"data.tokenizer={other}"), [], workdir)


def test_a_run_trains_with_an_hf_tokenizer_that_its_checkpoints_carry(byte_level_dir,
                                                                       text_corpus, tmp_path):
  workdir = tmp_path / "run"
  train(tiny_config(f"data.source=files:{text_corpus}/*.py", "model.vocab_size=700",
                    f"data.tokenizer={byte_level_dir}", "train.steps=2", "train.warmup_steps=1",
                    "train.sample_tokens=4"), workdir)
  for name in ("tokenizer.json", "tokenizer_config.json"):
    (workdir / name).unlink()  # the checkpoint alone rebuilds it
  run = load_run(workdir)
  assert run.tokenizer.to_bytes() == hf_tokenizer.load_hf_tokenizer(byte_level_dir).to_bytes()
  assert run.encode_prompt("def f")[0] == run.tokenizer.bos_id == 0
  assert isinstance(run.generate("def f", max_new_tokens=3)[0][0], str)


def test_cli_encodes_and_decodes_with_an_hf_directory(byte_level_dir, capsys):
  ours = hf_tokenizer.load_hf_tokenizer(byte_level_dir)
  text = "  def main():\n\treturn 'é 日本 🎉'"
  assert cli.main(["tokenizer", "encode", "--tokenizer", str(byte_level_dir), text]) == 0
  ids = capsys.readouterr().out.split()
  assert ids == [str(i) for i in ours.encode(text)]
  assert cli.main(["tokenizer", "decode", "--tokenizer", str(byte_level_dir), " ".join(ids)]) == 0
  assert capsys.readouterr().out == text + "\n"
