"""Tokenizers: the interface the rest of the code uses, SentencePiece BPE models (training on
a text sample, loading), Hugging Face tokenizers (`llm_jax.data.hf_tokenizer`), and the one
place a run gets its tokenizer (`for_run`).

Trained models use byte fallback (any text encodes, nothing maps to <unk>), identity
normalisation and no whitespace collapsing (source code keeps its indentation), and reserve
pad=0, unk=1, bos=2, eos=3 plus the chat tokens below as single, unsplittable pieces.
"""

import io
import pathlib
from collections.abc import Iterable
from typing import Protocol

import jax
import sentencepiece as spm
from jax.experimental import multihost_utils

from llm_jax.data import hf_tokenizer, sources
from llm_jax.data.chat_template import CHAT_TOKENS, OWN_FORMAT_JINJA
from llm_jax.data.documents import Source
from llm_jax.parallel.distributed import is_primary, log
from llm_jax import paths
from llm_jax.errors import UserError

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
MIN_VOCAB_SIZE = 384  # what a trained tokenizer needs; given and imported ones may be smaller
# SentencePiece reads "sentences"; a few lines of text per sentence keeps newlines inside
# pieces (so '):\n' and indentation runs can become tokens) while staying under its limit.
_LINES_PER_SENTENCE = 8
_MAX_SENTENCE_BYTES = 16_384


class Tokenizer(Protocol):
  """What the code uses of a tokenizer: `SentencePieceTokenizer` or `hf_tokenizer.HFTokenizer`."""

  vocab_size: int
  bos_id: int
  eos_id: int
  # None for a Hugging Face tokenizer without a pad token. Nothing reads it: batches pad with
  # id 0 at weight 0.
  pad_id: int | None
  chat_template: str | None  # the Jinja template of a Hugging Face tokenizer_config.json

  def encode(self, text: str) -> list[int]:
    """The text's ids, without bos or eos (callers add them)."""

  def decode(self, ids) -> str: ...

  def id_to_piece(self, token_id: int) -> str: ...

  def piece_id(self, piece: str) -> int | None:
    """The id of the single token `piece`, or None if the vocabulary has no such token."""

  def to_bytes(self) -> bytes:
    """What a checkpoint stores; `tokenizer_from_bytes` reads it back."""

  def save(self, workdir) -> None:
    """Writes the run directory's tokenizer files (`saved_tokenizer` reads them)."""

  def export_hf(self, out_dir) -> None:
    """Writes files `transformers.AutoTokenizer` loads, encoding exactly as this does."""


class SentencePieceTokenizer:
  """A SentencePiece model: llm-jax's own tokenizers, and .model files given as data.tokenizer."""

  chat_template = None

  def __init__(self, model_proto: bytes):
    self.model_proto = model_proto
    self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
    self.vocab_size = self._sp.get_piece_size()
    self.pad_id, self.bos_id, self.eos_id = self._sp.pad_id(), self._sp.bos_id(), self._sp.eos_id()

  def encode(self, text: str) -> list[int]:
    return self._sp.encode(text)

  def decode(self, ids) -> str:
    return self._sp.decode([int(i) for i in ids])

  def id_to_piece(self, token_id: int) -> str:
    return self._sp.id_to_piece(int(token_id))

  def piece_id(self, piece: str) -> int | None:
    token_id = self._sp.piece_to_id(piece)  # unk's id for an unknown piece
    return token_id if self._sp.id_to_piece(token_id) == piece else None

  def to_bytes(self) -> bytes:
    return self.model_proto  # as every checkpoint has stored it

  def save(self, path) -> None:
    """Writes the model to `path`, or to `path`/tokenizer.model if `path` is a directory."""
    path = pathlib.Path(path)
    if path.is_dir():
      path = path / "tokenizer.model"
    paths.write_atomically(path, self.model_proto)

  def export_hf(self, out_dir) -> None:
    """A tokenizer.json that encodes exactly as SentencePiece does (`hf_tokenizer.
    sentencepiece_json`), loaded by transformers as written."""
    sp = self._sp
    # transformers 4 cleans up spaces before punctuation when decoding unless told not to.
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
              **{key: sp.id_to_piece(token_id) for key, token_id in (
                  ("bos_token", sp.bos_id()), ("eos_token", sp.eos_id()),
                  ("pad_token", sp.pad_id()), ("unk_token", sp.unk_id())) if token_id >= 0}}
    if all(self.piece_id(token) is not None for token in CHAT_TOKENS):
      config["chat_template"] = OWN_FORMAT_JINJA  # our chat format, for apply_chat_template
    hf_tokenizer.HFTokenizer(hf_tokenizer.sentencepiece_json(self.model_proto, "This tokenizer"),
                             config, "this tokenizer").export_hf(out_dir)


def load_tokenizer(path) -> Tokenizer:
  """A SentencePiece .model file, or a Hugging Face model directory or its tokenizer.json."""
  path = pathlib.Path(path)
  if path.is_dir() or (path.name == hf_tokenizer.TOKENIZER_JSON and path.is_file()):
    return hf_tokenizer.load_hf_tokenizer(path if path.is_dir() else path.parent)
  if not path.is_file():
    raise UserError(f"Tokenizer {path} does not exist; give a SentencePiece .model file, a "
                    "Hugging Face model directory or its tokenizer.json, or leave "
                    "data.tokenizer empty to train one.")
  try:
    return SentencePieceTokenizer(path.read_bytes())
  except RuntimeError:
    raise UserError(f"Tokenizer {path} is not a SentencePiece model; give a .model file "
                    "written by SentencePiece or llm-jax, or a Hugging Face model directory.") \
        from None


def tokenizer_from_bytes(data: bytes) -> Tokenizer:
  """The tokenizer `to_bytes` wrote: an HF tokenizer's JSON, or a SentencePiece model (which
  is all that checkpoints written before HF tokenizers hold)."""
  # A SentencePiece model never starts with "{": its first byte tags field 1, `pieces`.
  if data[:1] == b"{":
    return hf_tokenizer.HFTokenizer.from_bytes(data)
  return SentencePieceTokenizer(data)


def saved_tokenizer(workdir) -> Tokenizer | None:
  """The run directory's own tokenizer (tokenizer.json of an HF one, else tokenizer.model), or
  None before the run has saved one."""
  workdir = pathlib.Path(workdir)
  if (workdir / hf_tokenizer.TOKENIZER_JSON).exists():
    return hf_tokenizer.load_saved(workdir)
  if (workdir / "tokenizer.model").exists():
    return load_tokenizer(workdir / "tokenizer.model")
  return None


def _sentences(texts: Iterable[str]):
  for text in texts:
    lines = text.splitlines(keepends=True)
    for i in range(0, len(lines), _LINES_PER_SENTENCE):
      sentence = "".join(lines[i:i + _LINES_PER_SENTENCE])
      if sentence.strip():
        yield sentence[:_MAX_SENTENCE_BYTES // 4]  # a char is at most 4 UTF-8 bytes


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> SentencePieceTokenizer:
  """Trains a byte-fallback BPE model of exactly `vocab_size` pieces on `texts`."""
  if vocab_size < MIN_VOCAB_SIZE:
    raise UserError(f"model.vocab_size={vocab_size} is too small for a byte-fallback "
                    f"tokenizer (256 bytes, 7 special tokens and the common characters); use "
                    f"at least {MIN_VOCAB_SIZE}.")
  model = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=_sentences(texts), model_writer=model, model_type="bpe",
        vocab_size=vocab_size, byte_fallback=True, character_coverage=0.995,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=False, allow_whitespace_only_pieces=True, split_digits=True,
        max_sentence_length=_MAX_SENTENCE_BYTES, user_defined_symbols=list(CHAT_TOKENS),
        pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
        num_threads=2, minloglevel=2)
  except RuntimeError as e:
    raise UserError(f"Could not train a tokenizer with vocab_size={vocab_size} on this text "
                    f"({str(e).strip().splitlines()[-1]}); lower model.vocab_size or add "
                    "text.") from None
  return SentencePieceTokenizer(model.getvalue())


def train_on_sources(mixture: list[tuple[Source, float]], vocab_size: int,
                     sample_bytes: int, seed: int) -> SentencePieceTokenizer:
  """A tokenizer trained on about `sample_bytes` of the sources' training split."""
  return train_tokenizer(sources.text_sample(mixture, sample_bytes, seed), vocab_size)


def for_run(config, mixture: list[tuple[Source, float]], workdir=None,
            inherited: bytes | None = None) -> Tokenizer:
  """The run's tokenizer: the workdir's own, else `data.tokenizer`, else `inherited` (the
  `to_bytes()` of the tokenizer of the run `train.init_from` starts from), else a
  SentencePiece model trained on the sources.

  With a `workdir`, process 0 saves it there (once) and every process reads it back, so all
  processes tokenize alike. It may have fewer pieces than `model.vocab_size` (an embedding
  padded to a round size, as imported models have), never more; a trained one has exactly
  that many.
  """
  given = config.data.tokenizer
  tokenizer = saved = saved_tokenizer(workdir) if workdir is not None else None
  if saved is not None:
    if given and load_tokenizer(given).to_bytes() != saved.to_bytes():
      raise UserError(f"data.tokenizer={given} differs from the tokenizer already in {workdir}; "
                      "pass a new --workdir or drop data.tokenizer.")
  elif given:
    tokenizer = load_tokenizer(given)
  elif inherited is not None:
    tokenizer = tokenizer_from_bytes(inherited)
  elif is_primary() or workdir is None:
    log(f"Training a {config.model.vocab_size}-piece SentencePiece BPE tokenizer on "
        f"{config.data.tokenizer_sample_bytes / 1e6:.1f} MB of the training split")
    tokenizer = train_on_sources(mixture, config.model.vocab_size,
                                 config.data.tokenizer_sample_bytes, config.train.seed)
  if tokenizer is not None and tokenizer.vocab_size > config.model.vocab_size:
    raise UserError(f"The tokenizer has {tokenizer.vocab_size} pieces but model.vocab_size="
                    f"{config.model.vocab_size}; set --config.model.vocab_size="
                    f"{tokenizer.vocab_size} or more.")
  if workdir is None:
    return tokenizer
  if is_primary() and saved is None:
    pathlib.Path(workdir).mkdir(parents=True, exist_ok=True)
    tokenizer.save(workdir)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("tokenizer saved")
    tokenizer = saved_tokenizer(workdir)
  return tokenizer
