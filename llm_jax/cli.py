"""`llm-jax <command>`: parses arguments, validates, calls library functions. Nothing else.

Bad input raises `UserError`; it is printed as one line and the process exits with status 2.
"""

import argparse
import json
import pathlib
import statistics
import sys

from llm_jax.errors import UserError


def _split_overrides(extra: list[str]) -> list[str]:
  """Collects `--config.a.b=v` and `--config.a.b v` arguments; anything else is an error."""
  overrides, i = [], 0
  while i < len(extra):
    arg = extra[i]
    if not arg.startswith("--config."):
      raise UserError(f"Unknown argument {arg!r}; config values are set as --config.KEY=VALUE.")
    if "=" in arg:
      overrides.append(arg.removeprefix("--"))
      i += 1
    elif i + 1 < len(extra):
      overrides.append(f"{arg.removeprefix('--')}={extra[i + 1]}")
      i += 2
    else:
      raise UserError(f"{arg} has no value; write {arg}=VALUE.")
  return overrides


def _load_config(args, overrides):
  from llm_jax import config as config_lib
  return config_lib.load_config(args.config, overrides)


def _train(args, overrides) -> None:
  from llm_jax.train.loop import train
  train(_load_config(args, overrides), args.workdir)


def _no_overrides(overrides) -> None:
  if overrides:
    raise UserError(f"This command takes no config overrides (got {overrides[0]!r}).")


def _tokenizer_train(args, overrides) -> None:
  from llm_jax import config as config_lib
  from llm_jax.data import sources
  from llm_jax.data.tokenizer import train_tokenizer
  out = pathlib.Path(args.out)
  if out.exists():
    raise UserError(f"{out} already exists; choose another --out (nothing was overwritten).")
  config = config_lib.load_config(None, [
      f"data.source={args.source}", f"data.text_key={args.text_key}",
      f"data.tfds_data_dir={args.tfds_data_dir}", *overrides])
  mixture = sources.open_sources(config.data)
  for source, _ in mixture:
    print(source.summary(), file=sys.stderr)
  tokenizer = train_tokenizer(sources.text_sample(mixture, args.sample_bytes, args.seed),
                              args.vocab_size)
  out.parent.mkdir(parents=True, exist_ok=True)
  tokenizer.save(out)
  print(f"Wrote a {tokenizer.vocab_size}-piece tokenizer to {out}", file=sys.stderr)


def _text_argument(args) -> str:
  return args.text if args.text is not None else sys.stdin.read()


def _tokenizer_encode(args, overrides) -> None:
  from llm_jax.data.tokenizer import load_tokenizer
  _no_overrides(overrides)
  tokenizer = load_tokenizer(args.tokenizer)
  ids = tokenizer.encode(_text_argument(args))
  if args.pieces:
    for token_id in ids:
      print(f"{token_id}\t{tokenizer.id_to_piece(token_id)!r}")
  else:
    print(" ".join(map(str, ids)))


def _tokenizer_decode(args, overrides) -> None:
  from llm_jax.data.tokenizer import load_tokenizer
  _no_overrides(overrides)
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


def _data_prepare(args, overrides) -> None:
  from llm_jax.data import tfds_source
  _no_overrides(overrides)
  corpus = tfds_source.prepare(args.files, args.name, args.data_dir, args.text_key,
                               args.val_fraction)
  print(f"{corpus.summary()}\nPrepared TFDS dataset {args.name!r} in {args.data_dir}; train "
        f"on it with --config.data.source=tfds:{args.name} "
        f"--config.data.tfds_data_dir={args.data_dir}", file=sys.stderr)


def _data_bench(args, overrides) -> None:
  from llm_jax.data import bench
  if args.batches < 1:
    raise UserError(f"--batches={args.batches} must be at least 1.")
  result = bench.measure(_load_config(args, overrides), args.batches)
  if args.against:
    metrics = pathlib.Path(args.against) / "metrics.jsonl"
    if not metrics.is_file():
      raise UserError(f"{metrics} does not exist; give --against the workdir of a run.")
    rates = [row["tokens_per_sec"] for row in map(json.loads, metrics.read_text().splitlines())
             if "tokens_per_sec" in row]
    if not rates:
      raise UserError(f"{metrics} has no tokens_per_sec rows yet; let the run log first.")
    result["train_tokens_per_sec"] = statistics.median(rates)
    result["feed_ratio"] = result["tokens_per_sec"] / result["train_tokens_per_sec"]
  if args.json:
    print(json.dumps(result))
    return
  for line in result["sources"]:
    print(line)
  print(f"index {result['index_sec']:.2f}s, tokenizer {result['tokenizer_sec']:.2f}s, "
        f"first batch {result['first_batch_sec']:.3f}s")
  print(f"pipeline: {result['tokens_per_sec']:,.0f} tokens/s over {result['batches']} batches "
        f"of {result['batch_tokens']} tokens")
  if "feed_ratio" in result:
    print(f"training in {args.against} consumes {result['train_tokens_per_sec']:,.0f} "
          f"tokens/s: the pipeline is {result['feed_ratio']:.0f}x faster")


def _bench(args, overrides) -> None:
  from llm_jax import bench
  if args.steps < 1:
    raise UserError(f"--steps={args.steps} must be at least 1.")
  out = pathlib.Path(args.out) if args.out else None
  if out is not None and out.exists():
    raise UserError(f"{out} already exists; choose another --out (nothing was overwritten).")
  result = bench.measure(_load_config(args, overrides), args.steps,
                         inference=not args.train_only)
  if out is not None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
  if args.json:
    print(json.dumps(result))
    return
  print(bench.summary(result))


def _add_config_arguments(parser) -> None:
  parser.add_argument("--config", default=None,
                      help="config file PATH.py[:variant] (default: configs/base.py)")


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="llm-jax", description=__doc__.splitlines()[0])
  commands = parser.add_subparsers(dest="command", required=True)

  train = commands.add_parser(
      "train", help="train a model (resumes if WORKDIR has checkpoints)",
      description="Train a model; config values are overridden with --config.KEY=VALUE.")
  _add_config_arguments(train)
  train.add_argument("--workdir", default="runs/default",
                     help="run directory: config, tokenizer, metrics, checkpoints")
  train.set_defaults(handler=_train)

  tokenizer = commands.add_parser("tokenizer", help="train or inspect a SentencePiece tokenizer")
  tokenizer_commands = tokenizer.add_subparsers(dest="tokenizer_command", required=True)
  tok_train = tokenizer_commands.add_parser(
      "train", help="train a byte-fallback BPE tokenizer on a data source")
  tok_train.add_argument("--source", default="builtin", help="a data.source value")
  tok_train.add_argument("--vocab_size", type=int, required=True)
  tok_train.add_argument("--out", required=True, help="path of the .model file to write")
  tok_train.add_argument("--sample_bytes", type=int, default=4_000_000,
                         help="bytes of training-split text to train on")
  tok_train.add_argument("--text_key", default="text", help="text field of .jsonl and TFDS")
  tok_train.add_argument("--tfds_data_dir", default="", help="where tfds: data is prepared")
  tok_train.add_argument("--seed", type=int, default=0, help="seed of the text sample")
  tok_train.set_defaults(handler=_tokenizer_train)
  for name, handler, what in (("encode", _tokenizer_encode, "TEXT (default: stdin)"),
                              ("decode", _tokenizer_decode, "IDS (default: stdin)")):
    sub = tokenizer_commands.add_parser(name, help=f"{name} {what}")
    sub.add_argument("--tokenizer", required=True, help="path of a SentencePiece .model")
    sub.add_argument("text", nargs="?", default=None, help=what)
    if name == "encode":
      sub.add_argument("--pieces", action="store_true", help="print one id and piece per line")
    sub.set_defaults(handler=handler)

  data = commands.add_parser("data", help="prepare datasets and measure the input pipeline")
  data_commands = data.add_subparsers(dest="data_command", required=True)
  prepare = data_commands.add_parser(
      "prepare", help="build a TFDS dataset (ArrayRecord, train/validation) from local files")
  prepare.add_argument("--files", required=True, help="glob of .txt/.md/.jsonl/... files")
  prepare.add_argument("--name", required=True, help="TFDS dataset name (snake_case)")
  prepare.add_argument("--data_dir", required=True, help="TFDS data directory to write into")
  prepare.add_argument("--text_key", default="text", help="text field of .jsonl lines")
  prepare.add_argument("--val_fraction", type=float, default=0.02,
                       help="share of documents in the validation split")
  prepare.set_defaults(handler=_data_prepare)
  bench = data_commands.add_parser(
      "bench", help="print the pipeline's throughput in tokens/s for a config")
  _add_config_arguments(bench)
  bench.add_argument("--batches", type=int, default=200, help="batches to time")
  bench.add_argument("--against", default=None,
                     help="workdir of a run: also print how many times faster than it trains")
  bench.add_argument("--json", action="store_true", help="print one JSON object")
  bench.set_defaults(handler=_data_bench)

  bench_command = commands.add_parser(
      "bench", help="time the train step, prefill and decode of a config",
      description="Time the real jitted train step (and prefill and decode) of a config on a "
                  "synthetic batch: compile time, median step time, tokens/s, FLOPs, MFU.")
  _add_config_arguments(bench_command)
  bench_command.add_argument("--steps", type=int, default=10,
                             help="timed calls after warm-up; the median is reported")
  bench_command.add_argument("--train_only", action="store_true",
                             help="skip the prefill and decode measurements")
  bench_command.add_argument("--out", default=None, help="also write the JSON to this new file")
  bench_command.add_argument("--json", action="store_true", help="print one JSON object")
  bench_command.set_defaults(handler=_bench)
  return parser


def main(argv: list[str] | None = None) -> int:
  parser = build_parser()
  args, extra = parser.parse_known_args(argv)
  try:
    args.handler(args, _split_overrides(extra))
  except UserError as e:
    print(f"llm-jax: error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print("llm-jax: interrupted", file=sys.stderr)
    return 130
  return 0


if __name__ == "__main__":
  sys.exit(main())
