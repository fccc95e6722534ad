"""Hugging Face tokenizers: a model directory's tokenizer.json (or SentencePiece
tokenizer.model) with the special tokens and chat template of its tokenizer_config.json,
encoding as `transformers.AutoTokenizer` does for that directory; and the conversion of a
SentencePiece model into a tokenizer.json that encodes exactly as SentencePiece does.

transformers 5 uses tokenizer.json as written, except for a `LlamaTokenizer` of a `llama`
model (Llama 2): that class keeps only the vocabulary, merges and added tokens and sets its
own Metaspace pre-tokenizer, so "  x" loses the dummy prefix SentencePiece would add. We do
the same. Other tokenizer classes with a pipeline of their own (Gemma, ...) are read as their
tokenizer.json says.

An `HFTokenizer` is its tokenizer.json text and a tokenizer_config.json with everything
resolved into it (special tokens from special_tokens_map.json or config.json's ids, the chat
template from chat_template.jinja, the tokenizer class transformers effectively uses), so those
two files alone rebuild it: they are what a run directory, a checkpoint and an export hold.
"""

import json
import pathlib

import tokenizers
from google.protobuf.message import DecodeError
from sentencepiece import sentencepiece_model_pb2
from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers, processors

from llm_jax import paths
from llm_jax.errors import UserError

TOKENIZER_JSON, TOKENIZER_CONFIG = "tokenizer.json", "tokenizer_config.json"
_NAMED_TOKENS = ("bos_token", "eos_token", "pad_token", "unk_token")
_SPACE = "\u2581"  # SentencePiece's visible space
# sentencepiece_model.proto: ModelType BPE, and the piece types.
_BPE = 2
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED = 1, 2, 3, 4


class HFTokenizer:
  """A `tokenizers` tokenizer with the special ids and chat template of its config."""

  def __init__(self, tokenizer_json: str, config: dict, source: str,
               fallback_ids: dict[str, int] | None = None):
    """`source` names where the files came from, for error messages; `fallback_ids` are the
    ids of special tokens the config does not name (they are written into it)."""
    self.tokenizer_json, self.config = tokenizer_json, dict(config)
    try:
      self._tokenizer = tokenizers.Tokenizer.from_str(tokenizer_json)
    except Exception as e:  # the Rust side raises a bare Exception
      raise UserError(f"The tokenizer.json of {source} does not load ({e}); replace it with one "
                      "saved by transformers or the tokenizers library.") from None
    for key, token_id in (fallback_ids or {}).items():
      if self.config.get(key) is None:
        self.config[key] = self._tokenizer.id_to_token(token_id)  # None if out of range
    if _is_llama(self.config):
      _use_llama_pipeline(self._tokenizer, self.config)
    # transformers never truncates, pads or splits special tokens unless asked to.
    self._tokenizer.no_truncation()
    self._tokenizer.no_padding()
    self._tokenizer.encode_special_tokens = bool(self.config.get("split_special_tokens", False))
    self._add_special_tokens(source)
    self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)
    self.bos_id, self.eos_id, self.pad_id = (self._id_of(key)
                                             for key in ("bos_token", "eos_token", "pad_token"))
    for key, token_id in (("bos_token", self.bos_id), ("eos_token", self.eos_id)):
      if token_id is None:
        raise UserError(f"The tokenizer_config.json of {source} names no {key}, and llm-jax "
                        f"wraps every document in bos and eos; set {key} there.")
    template = self.config.get("chat_template")
    if isinstance(template, list):  # named templates; transformers applies "default"
      template = next((t["template"] for t in template if t.get("name") == "default"), None)
    self.chat_template = template

  def _add_special_tokens(self, source: str) -> None:
    """Makes the config's special tokens whole tokens, as transformers does on loading."""
    added = {token.content for token in self._tokenizer.get_added_tokens_decoder().values()}
    listed = [self.config.get(key) for key in _NAMED_TOKENS]
    for key in ("additional_special_tokens", "extra_special_tokens"):
      extra = self.config.get(key) or []
      listed += list(extra.values()) if isinstance(extra, dict) else extra
    listed += list((self.config.get("added_tokens_decoder") or {}).values())
    for token in listed:
      if token is None or _content(token) in added:
        continue
      if self._tokenizer.token_to_id(_content(token)) is None:
        raise UserError(f"The tokenizer_config.json of {source} names the special token "
                        f"{_content(token)!r}, which its tokenizer.json lacks; remove it from "
                        "tokenizer_config.json or add it to tokenizer.json.")
      flags = {k: v for k, v in token.items() if k not in ("content", "__type")} \
          if isinstance(token, dict) else {}
      self._tokenizer.add_tokens([AddedToken(_content(token), **{
          "special": True, "normalized": False, **flags})])

  def _id_of(self, key: str) -> int | None:
    token = self.config.get(key)
    return None if token is None else self._tokenizer.token_to_id(_content(token))

  def encode(self, text: str) -> list[int]:
    return self._tokenizer.encode(text, add_special_tokens=False).ids

  def decode(self, ids) -> str:
    # Unlike transformers, never `clean_up_tokenization_spaces`: decode inverts encode.
    return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

  def id_to_piece(self, token_id: int) -> str:
    return self._tokenizer.id_to_token(int(token_id))

  def piece_id(self, piece: str) -> int | None:
    return self._tokenizer.token_to_id(piece)

  def to_bytes(self) -> bytes:
    return json.dumps({TOKENIZER_JSON: self.tokenizer_json, TOKENIZER_CONFIG: self.config},
                      ensure_ascii=False).encode("utf-8")

  @classmethod
  def from_bytes(cls, data: bytes) -> "HFTokenizer":
    files = json.loads(data)
    return cls(files[TOKENIZER_JSON], files[TOKENIZER_CONFIG], "the checkpoint's tokenizer")

  def save(self, directory) -> None:
    """Writes tokenizer_config.json, then tokenizer.json (whose presence marks both done)."""
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths.write_atomically(directory / TOKENIZER_CONFIG,
                           json.dumps(self.config, indent=2, ensure_ascii=False) + "\n")
    paths.write_atomically(directory / TOKENIZER_JSON, self.tokenizer_json)

  # The two resolved files are a complete Hugging Face tokenizer directory.
  export_hf = save


def _content(token) -> str:
  """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
  return token["content"] if isinstance(token, dict) else str(token)


def _is_llama(config: dict) -> bool:
  return (config.get("tokenizer_class") or "").removesuffix("Fast") == "LlamaTokenizer"


def _use_llama_pipeline(tokenizer: tokenizers.Tokenizer, config: dict) -> None:
  """The pipeline transformers 5's LlamaTokenizer sets, whatever tokenizer.json says."""
  prefix = config.get("add_prefix_space") is not False  # None means yes
  tokenizer.normalizer = None
  tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(
      replacement=_SPACE, split=False,
      prepend_scheme=("always" if config.get("legacy", False) else "first") if prefix else "never")
  tokenizer.decoder = _sentencepiece_decoder(strip_prefix=prefix)


def _sentencepiece_decoder(strip_prefix: bool):
  steps = [decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
  return decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if strip_prefix else []))


def _read_json(path: pathlib.Path) -> dict | None:
  if not path.is_file():
    return None
  try:
    value = json.loads(path.read_text(encoding="utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise UserError(f"{path} is not valid JSON ({e}); repair or replace it.") from None
  if not isinstance(value, dict):
    raise UserError(f"{path} holds a JSON {type(value).__name__}, not an object; repair or "
                    "replace it.")
  return value


def _effective_class(config: dict, model_config: dict, tokenizer_json: str) -> str:
  """The tokenizer class to record: LlamaTokenizerFast where transformers 5 rebuilds the
  pipeline as Llama's, else the declared class (PreTrainedTokenizerFast for a declared Llama
  tokenizer that transformers loads as written: a Mistral model's, or a byte-level one)."""
  declared = config.get("tokenizer_class") or model_config.get("tokenizer_class")
  model_type = model_config.get("model_type") or ""
  named_llama = ((declared or "").removesuffix("Fast") == "LlamaTokenizer"
                 or (declared is None and model_type == "llama"))
  if named_llama and model_type in ("", "llama") and '"ByteLevel"' not in tokenizer_json:
    return "LlamaTokenizerFast"
  return "PreTrainedTokenizerFast" if named_llama or declared is None else declared


def sentencepiece_json(model_proto: bytes, source) -> str:
  """A tokenizer.json that encodes exactly as SentencePiece does with this BPE model.

  SentencePiece merges, again and again, the adjacent pair whose joined piece is the
  highest-scoring normal piece; a BPE merge list ranked by that score does the same.
  User-defined pieces (llm-jax's chat tokens) are matched whole in the raw text and never
  merged, like added tokens. Control pieces become special added tokens, as transformers makes
  bos and eos anyway: unlike SentencePiece, a text containing "<s>" then encodes it as bos.
  """
  try:
    model = sentencepiece_model_pb2.ModelProto.FromString(model_proto)
  except DecodeError:
    raise UserError(f"{source} is not a SentencePiece model; give a .model file written by "
                    "SentencePiece, or a tokenizer.json.") from None
  spec, trainer = model.normalizer_spec, model.trainer_spec
  # A non-identity normalisation rule is stored as a precompiled character map.
  if (trainer.model_type != _BPE or spec.precompiled_charsmap or spec.remove_extra_whitespaces
      or not spec.escape_whitespaces):
    raise UserError(f"{source} is a SentencePiece model that llm-jax cannot convert exactly "
                    "(that takes BPE, identity normalisation and no whitespace removal); use a "
                    "Hugging Face directory with a tokenizer.json instead.")
  pieces = model.pieces
  vocab = {piece.piece: i for i, piece in enumerate(pieces)}
  normal = {piece.piece: (-piece.score, i) for i, piece in enumerate(pieces)
            if piece.type == _NORMAL}
  merges = [(piece[:k], piece[k:]) for piece in sorted(normal, key=normal.get)
            for k in range(1, len(piece)) if piece[:k] in normal and piece[k:] in normal]
  tokenizer = tokenizers.Tokenizer(models.BPE(vocab, merges, unk_token=trainer.unk_piece,
                                              fuse_unk=True, byte_fallback=trainer.byte_fallback))
  # SentencePiece adds its dummy prefix once, at the start; Prepend adds it to every stretch
  # of text between added tokens, so the two differ only right after an added token.
  tokenizer.normalizer = normalizers.Sequence(
      [normalizers.Replace(" ", _SPACE)] + ([normalizers.Prepend(_SPACE)]
                                            if spec.add_dummy_prefix else []))
  tokenizer.decoder = _sentencepiece_decoder(strip_prefix=spec.add_dummy_prefix)
  tokenizer.add_special_tokens([AddedToken(piece.piece, special=True, normalized=False)
                                for piece in pieces if piece.type in (_UNKNOWN, _CONTROL)])
  tokenizer.add_tokens([AddedToken(piece.piece, special=False, normalized=False)
                        for piece in pieces if piece.type == _USER_DEFINED])
  if trainer.bos_id >= 0:  # `tokenizer(text)` starts with bos, as llm-jax's documents do
    bos = trainer.bos_piece
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, trainer.bos_id)])
  return tokenizer.to_str()


def load_hf_tokenizer(directory) -> HFTokenizer:
  """The tokenizer of a Hugging Face model directory: its tokenizer.json (which transformers
  prefers), else its SentencePiece tokenizer.model, with tokenizer_config.json."""
  directory = pathlib.Path(directory)
  config = _read_json(directory / TOKENIZER_CONFIG) or {}
  special_tokens = _read_json(directory / "special_tokens_map.json") or {}
  model_config = _read_json(directory / "config.json") or {}
  for key in _NAMED_TOKENS:
    if config.get(key) is None and special_tokens.get(key) is not None:
      config[key] = special_tokens[key]
  template = directory / "chat_template.jinja"
  if template.is_file():  # transformers lets it override tokenizer_config.json's
    config["chat_template"] = template.read_text(encoding="utf-8")
  if (directory / TOKENIZER_JSON).is_file():
    tokenizer_json = (directory / TOKENIZER_JSON).read_text(encoding="utf-8")
  elif (directory / "tokenizer.model").is_file():
    tokenizer_json = sentencepiece_json((directory / "tokenizer.model").read_bytes(),
                                        directory / "tokenizer.model")
  else:
    raise UserError(f"{directory} has neither tokenizer.json nor tokenizer.model; give a "
                    "Hugging Face model directory that has one.")
  config["tokenizer_class"] = _effective_class(config, model_config, tokenizer_json)
  # Generation stops at config.json's eos_token_id; take its ids where the tokenizer names none.
  fallback_ids = {key: model_config.get(f"{key}_id") for key in ("bos_token", "eos_token")}
  fallback_ids = {key: token_id[0] if isinstance(token_id, list) else token_id
                  for key, token_id in fallback_ids.items() if token_id not in (None, [])}
  return HFTokenizer(tokenizer_json, config, str(directory), fallback_ids)


def load_saved(directory) -> HFTokenizer:
  """What `HFTokenizer.save` wrote into `directory`: the two files, already resolved."""
  directory = pathlib.Path(directory)
  return HFTokenizer((directory / TOKENIZER_JSON).read_text(encoding="utf-8"),
                     _read_json(directory / TOKENIZER_CONFIG) or {}, str(directory))
