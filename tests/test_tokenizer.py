import pytest

from llm_jax import cli
from llm_jax.data.tokenizer import BOS_ID, CHAT_TOKENS, EOS_ID, PAD_ID, load_tokenizer
from llm_jax.errors import UserError


@pytest.mark.parametrize("text", [
    "def f(x):\n    return x  +  1\n\n\n",
    "L'élève à l'école: «Ça va très bien», dit-il — où êtes-vous?",
    "emoji 🎉🙂👩‍🔬 and CJK 日本語",
    "\tmixed\r\nline endings  and   runs of spaces ",
    "<|im_start|>user<|im_sep|>bonjour 👋<|im_end|>",
])
def test_round_trip(tokenizer, text):
  ids = tokenizer.encode(text)
  assert tokenizer.decode(ids) == text
  assert all(0 <= i < tokenizer.vocab_size for i in ids)


def test_reserved_ids_and_chat_tokens_are_single_pieces(tokenizer):
  assert (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id) == (PAD_ID, BOS_ID, EOS_ID)
  assert tokenizer.vocab_size == 512
  for token in CHAT_TOKENS:
    ids = tokenizer.encode(token)
    assert len(ids) == 1 and tokenizer.id_to_piece(ids[0]) == token
  ids = tokenizer.encode("a<|im_end|>b")
  assert tokenizer.encode("<|im_end|>")[0] in ids


def test_save_and_load(tokenizer, tmp_path):
  path = tmp_path / "tok.model"
  tokenizer.save(path)
  loaded = load_tokenizer(path)
  assert loaded.encode("hello world") == tokenizer.encode("hello world")


def test_bad_tokenizer_paths(tmp_path):
  with pytest.raises(UserError, match="does not exist"):
    load_tokenizer(tmp_path / "missing.model")
  junk = tmp_path / "junk.model"
  junk.write_bytes(b"not a model")
  with pytest.raises(UserError, match="not a SentencePiece model"):
    load_tokenizer(junk)


def _run(capsys, *args):
  code = cli.main(list(args))
  out, err = capsys.readouterr()
  return code, out, err


def test_tokenizer_commands_train_encode_decode(text_corpus, tmp_path, capsys):
  out_path = tmp_path / "tok.model"
  code, _, err = _run(capsys, "tokenizer", "train", "--source", f"files:{text_corpus}/*.py",
                      "--vocab_size", "400", "--out", str(out_path), "--sample_bytes", "200000")
  assert code == 0 and "400-piece" in err
  assert load_tokenizer(out_path).vocab_size == 400
  text = "def main():\n    return 42\n"
  code, ids, _ = _run(capsys, "tokenizer", "encode", "--tokenizer", str(out_path), text)
  assert code == 0 and ids.split() == [str(i) for i in load_tokenizer(out_path).encode(text)]
  code, decoded, _ = _run(capsys, "tokenizer", "decode", "--tokenizer", str(out_path),
                          ids.strip())
  assert code == 0 and decoded == text + "\n"
  code, pieces, _ = _run(capsys, "tokenizer", "encode", "--pieces", "--tokenizer",
                         str(out_path), "def")
  assert code == 0 and pieces.splitlines()[0].split("\t")[0].isdigit()

  before = out_path.read_bytes()  # an existing tokenizer is never overwritten
  code, _, err = _run(capsys, "tokenizer", "train", "--vocab_size", "400", "--out",
                      str(out_path))
  assert code == 2 and "already exists" in err and out_path.read_bytes() == before


@pytest.mark.parametrize("ids, words", [("2 99999", "outside this tokenizer's vocabulary"),
                                        ("2 x", "integer token ids")])
def test_decode_bad_ids(tokenizer, tmp_path, capsys, ids, words):
  path = tmp_path / "tok.model"
  tokenizer.save(path)
  code, _, err = _run(capsys, "tokenizer", "decode", "--tokenizer", str(path), ids)
  assert code == 2 and words in err


def test_a_vocabulary_too_small_to_train_is_refused():
  from llm_jax.data.tokenizer import train_tokenizer
  with pytest.raises(UserError, match="model.vocab_size=300 is too small"):
    train_tokenizer(["some text"], 300)
