import pytest

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
