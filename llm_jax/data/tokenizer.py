"""SentencePiece BPE tokenizer: training on a text sample, loading, encode/decode, and the
one place a run gets its tokenizer (`for_run`).

Trained models use byte fallback (any text encodes, nothing maps to <unk>), identity
normalisation and no whitespace collapsing (source code keeps its indentation), and reserve
pad=0, unk=1, bos=2, eos=3 plus the chat tokens below as single, unsplittable pieces.
"""

import io
import pathlib
from collections.abc import Iterable

import jax
import sentencepiece as spm
from jax.experimental import multihost_utils

from llm_jax.data import sources
from llm_jax.data.documents import Source
from llm_jax.distributed import is_primary, log
from llm_jax.errors import UserError

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
CHAT_TOKENS = ("<|im_start|>", "<|im_sep|>", "<|im_end|>")
# SentencePiece reads "sentences"; a few lines of text per sentence keeps newlines inside
# pieces (so '):\n' and indentation runs can become tokens) while staying under its limit.
_LINES_PER_SENTENCE = 8
_MAX_SENTENCE_BYTES = 16_384


class Tokenizer:
  """A loaded SentencePiece model with the ids the rest of the code relies on."""

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

  def save(self, path: pathlib.Path) -> None:
    path = pathlib.Path(path)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(self.model_proto)
    tmp.replace(path)  # atomic: a crash never leaves a half-written tokenizer


def load_tokenizer(path) -> Tokenizer:
  path = pathlib.Path(path)
  if not path.is_file():
    raise UserError(f"Tokenizer {path} does not exist; give the path of a SentencePiece "
                    ".model file or leave data.tokenizer empty to train one.")
  try:
    return Tokenizer(path.read_bytes())
  except RuntimeError:
    raise UserError(f"Tokenizer {path} is not a SentencePiece model; give a .model file "
                    "written by SentencePiece or llm-jax.") from None


def _sentences(texts: Iterable[str]):
  for text in texts:
    lines = text.splitlines(keepends=True)
    for i in range(0, len(lines), _LINES_PER_SENTENCE):
      sentence = "".join(lines[i:i + _LINES_PER_SENTENCE])
      if sentence.strip():
        yield sentence[:_MAX_SENTENCE_BYTES // 4]  # a char is at most 4 UTF-8 bytes


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
  """Trains a byte-fallback BPE model of exactly `vocab_size` pieces on `texts`."""
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
  return Tokenizer(model.getvalue())


def train_on_sources(mixture: list[tuple[Source, float]], vocab_size: int,
                     sample_bytes: int, seed: int) -> Tokenizer:
  """A tokenizer trained on about `sample_bytes` of the sources' training split."""
  return train_tokenizer(sources.text_sample(mixture, sample_bytes, seed), vocab_size)


def for_run(config, mixture: list[tuple[Source, float]], workdir=None,
            inherited: bytes | None = None) -> Tokenizer:
  """The run's tokenizer: the workdir's own, else `data.tokenizer`, else `inherited` (the
  tokenizer of the run `train.init_from` starts from), else one trained on the sources.

  With a `workdir`, process 0 saves it there as tokenizer.model (once) and every process
  reads it back, so all processes tokenize alike. It may have fewer pieces than
  `model.vocab_size` (an embedding padded to a round size, as imported models have), never
  more; a trained one has exactly that many.
  """
  saved = pathlib.Path(workdir) / "tokenizer.model" if workdir is not None else None
  given = config.data.tokenizer
  tokenizer = None
  if saved is not None and saved.exists():
    tokenizer = load_tokenizer(saved)
    if given and load_tokenizer(given).model_proto != tokenizer.model_proto:
      raise UserError(f"data.tokenizer={given} differs from {saved} already in the workdir; "
                      "pass a new --workdir or drop data.tokenizer.")
  elif given:
    tokenizer = load_tokenizer(given)
  elif inherited is not None:
    tokenizer = Tokenizer(inherited)
  elif is_primary() or saved is None:
    log(f"Training a {config.model.vocab_size}-piece SentencePiece BPE tokenizer on "
        f"{config.data.tokenizer_sample_bytes / 1e6:.1f} MB of the training split")
    tokenizer = train_on_sources(mixture, config.model.vocab_size,
                                 config.data.tokenizer_sample_bytes, config.train.seed)
  if tokenizer is not None and tokenizer.vocab_size > config.model.vocab_size:
    raise UserError(f"The tokenizer has {tokenizer.vocab_size} pieces but model.vocab_size="
                    f"{config.model.vocab_size}; set --config.model.vocab_size="
                    f"{tokenizer.vocab_size} or more.")
  if saved is None:
    return tokenizer
  if is_primary() and not saved.exists():
    tokenizer.save(saved)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("tokenizer saved")
    tokenizer = load_tokenizer(saved)
  return tokenizer
