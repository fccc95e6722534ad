"""`llm-jax tokenizer train|encode|decode`."""

import sys

from llm_jax import paths
from llm_jax.cli import common
from llm_jax.errors import UserError

# The options of `tokenizer train` are the config's keys, so a tokenizer trained here is the
# one `llm-jax train` would train for the same config.
_TRAIN_KEYS = {"source": "data.source", "vocab_size": "model.vocab_size",
               "sample_bytes": "data.tokenizer_sample_bytes", "text_key": "data.text_key",
               "tfds_data_dir": "data.tfds_data_dir", "seed": "train.seed"}


def _train(args, overrides) -> None:
  from llm_jax import config as config_lib
  from llm_jax.data import sources, tokenizer as tokenizer_lib
  out = paths.check_new_file(args.out, "--out")
  config = config_lib.load_config(None, [*common.as_overrides(args, _TRAIN_KEYS), *overrides])
  mixture = sources.open_sources(config.data)
  for source, _ in mixture:
    print(source.summary(), file=sys.stderr)
  tokenizer = tokenizer_lib.train_on_sources(mixture, config.model.vocab_size,
                                             config.data.tokenizer_sample_bytes,
                                             config.train.seed)
  out.parent.mkdir(parents=True, exist_ok=True)
  tokenizer.save(out)
  print(f"Wrote a {tokenizer.vocab_size}-piece tokenizer to {out}", file=sys.stderr)


def _text_argument(args) -> str:
  return args.text if args.text is not None else sys.stdin.read()


def _encode(args, overrides) -> None:
  from llm_jax.data.tokenizer import load_tokenizer
  common.no_overrides(overrides)
  tokenizer = load_tokenizer(args.tokenizer)
  ids = tokenizer.encode(_text_argument(args))
  if args.pieces:
    for token_id in ids:
      print(f"{token_id}\t{tokenizer.id_to_piece(token_id)!r}")
  else:
    print(" ".join(map(str, ids)))


def _decode(args, overrides) -> None:
  from llm_jax.data.tokenizer import load_tokenizer
  common.no_overrides(overrides)
  tokenizer = load_tokenizer(args.tokenizer)
  words = _text_argument(args).split()
  try:
    ids = [int(w) for w in words]
  except ValueError:
    raise UserError("decode takes whitespace-separated integer token ids, e.g. '2 451 17'.") \
        from None
  bad = [i for i in ids if not 0 <= i < tokenizer.vocab_size]
  if bad:
    raise UserError(f"Token id {bad[0]} is outside this tokenizer's vocabulary "
                    f"(0..{tokenizer.vocab_size - 1}).")
  sys.stdout.write(tokenizer.decode(ids) + "\n")


def add_commands(commands) -> None:
  tokenizer = commands.add_parser("tokenizer",
                                  help="train a tokenizer, or encode and decode with one")
  tokenizer_commands = tokenizer.add_subparsers(dest="tokenizer_command", required=True)
  train = tokenizer_commands.add_parser(
      "train", help="train a byte-fallback BPE tokenizer on a data source")
  train.add_argument("--source", help="a data.source value")
  train.add_argument("--vocab_size", type=int, required=True)
  train.add_argument("--out", required=True, help="path of the .model file to write")
  train.add_argument("--sample_bytes", type=int, help="bytes of training-split text to train on")
  train.add_argument("--text_key", help="text field of .jsonl and TFDS")
  train.add_argument("--tfds_data_dir", help="where tfds: data is prepared")
  train.add_argument("--seed", type=int, help="seed of the text sample")
  train.set_defaults(handler=_train)
  for name, handler, what in (("encode", _encode, "TEXT (default: stdin)"),
                              ("decode", _decode, "IDS (default: stdin)")):
    sub = tokenizer_commands.add_parser(name, help=f"{name} {what}")
    sub.add_argument("--tokenizer", required=True,
                     help="a SentencePiece .model, or a Hugging Face model directory")
    sub.add_argument("text", nargs="?", default=None, help=what)
    if name == "encode":
      sub.add_argument("--pieces", action="store_true", help="print one id and piece per line")
    sub.set_defaults(handler=handler)
