"""`llm-jax data prepare|bench`."""

import json
import pathlib
import statistics
import sys

from llm_jax import paths
from llm_jax.cli import common
from llm_jax.errors import UserError


def _prepare(args, overrides) -> None:
  from llm_jax import config as config_lib
  from llm_jax.data import tfds_source
  common.no_overrides(overrides)
  paths.check_directory(args.data_dir, "--data_dir")
  data = config_lib.load_config(None, common.as_overrides(
      args, {"text_key": "data.text_key", "val_fraction": "data.val_fraction"})).data
  corpus = tfds_source.prepare(args.files, args.name, args.data_dir, data.text_key,
                               data.val_fraction)
  print(f"{corpus.summary()}\nPrepared TFDS dataset {args.name!r} in {args.data_dir}; train "
        f"on it with --config.data.source=tfds:{args.name} "
        f"--config.data.tfds_data_dir={args.data_dir}", file=sys.stderr)


def _train_tokens_per_sec(workdir: str) -> float:
  """The median tokens/s logged by the run in `workdir`."""
  from llm_jax.train.metrics import read_metrics
  rates = [row["tokens_per_sec"] for row in read_metrics(workdir) if "tokens_per_sec" in row]
  if not rates:
    raise UserError(f"{pathlib.Path(workdir) / 'metrics.jsonl'} has no tokens_per_sec rows yet; "
                    "let the run log first.")
  return statistics.median(rates)


def _bench(args, overrides) -> None:
  from llm_jax.data import bench
  # The run is read first: a wrong --against fails before the minutes of measuring.
  train_rate = _train_tokens_per_sec(args.against) if args.against else None
  result = bench.measure(common.load_config(args, overrides), **common.given(args, "batches"))
  if train_rate is not None:
    result["train_tokens_per_sec"] = train_rate
    result["feed_ratio"] = result["tokens_per_sec"] / train_rate
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


def add_commands(commands) -> None:
  data = commands.add_parser("data", help="prepare datasets and measure the input pipeline")
  data_commands = data.add_subparsers(dest="data_command", required=True)
  prepare = data_commands.add_parser(
      "prepare", help="build a TFDS dataset (ArrayRecord, train/validation) from local files")
  prepare.add_argument("--files", required=True, help="glob of .txt/.md/.jsonl/... files")
  prepare.add_argument("--name", required=True, help="TFDS dataset name (snake_case)")
  prepare.add_argument("--data_dir", required=True, help="TFDS data directory to write into")
  prepare.add_argument("--text_key", help="text field of .jsonl lines")
  prepare.add_argument("--val_fraction", type=float,
                       help="share of documents in the validation split")
  prepare.set_defaults(handler=_prepare)
  bench = data_commands.add_parser(
      "bench", help="print the pipeline's throughput in tokens/s for a config")
  common.add_config_argument(bench)
  bench.add_argument("--batches", type=int, help="batches to time")
  bench.add_argument("--against",
                     help="workdir of a run: also print how many times faster than it trains")
  bench.add_argument("--json", action="store_true", help="print one JSON object")
  bench.set_defaults(handler=_bench)
