"""`llm-jax <command>`: parses arguments, validates, calls library functions. Nothing else.

Bad input raises `UserError`; it is printed as one line and the process exits with status 2.
"""

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys

from llm_jax import host_memory
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
  from llm_jax import distributed
  config = _load_config(args, overrides)
  distributed.initialize(config.distributed)  # before anything else uses JAX
  from llm_jax.train.loop import train
  train(config, args.workdir)


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


def _train_tokens_per_sec(workdir: str) -> float:
  """The median tokens/s logged by the run in `workdir`."""
  from llm_jax.train.metrics import read_metrics
  rates = [row["tokens_per_sec"] for row in read_metrics(workdir) if "tokens_per_sec" in row]
  if not rates:
    raise UserError(f"{pathlib.Path(workdir) / 'metrics.jsonl'} has no tokens_per_sec rows yet; "
                    "let the run log first.")
  return statistics.median(rates)


def _data_bench(args, overrides) -> None:
  from llm_jax.data import bench
  # The run is read first: a wrong --against fails before the minutes of measuring.
  train_rate = _train_tokens_per_sec(args.against) if args.against else None
  result = bench.measure(_load_config(args, overrides), args.batches)
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


def _load_run(args, overrides):
  from llm_jax.run import load_run
  from llm_jax import flops
  run = load_run(args.workdir, overrides)
  print(f"Loaded {args.workdir} at step {run.step}: "
        f"{flops.param_counts(run.model.config)['params'] / 1e6:.2f}M parameters, mesh "
        f"{dict(run.mesh.shape)}", file=sys.stderr)
  return run


def _generate(args, overrides) -> None:
  from llm_jax.data.prompts import read_prompt_file
  prompts = [args.prompt] if args.prompt_file is None else read_prompt_file(args.prompt_file)
  run = _load_run(args, overrides)
  outputs = run.generate(prompts, args.max_new_tokens, temperature=args.temperature,
                         top_k=args.top_k, top_p=args.top_p, beams=args.beams,
                         length_penalty=args.length_penalty, num_samples=args.num_samples,
                         seed=args.seed, batch_size=args.batch_size)
  texts = []
  for index, (prompt, samples) in enumerate(zip(prompts, outputs)):
    for sample, text in enumerate(samples):
      full = prompt + text if args.echo else text
      texts.append(json.dumps({"prompt_index": index, "sample": sample, "prompt": prompt,
                               "text": full}) if args.jsonl else full)
  sys.stdout.write(("\n" if args.jsonl else "\n\n").join(texts) + "\n")


def _predict(args, overrides) -> None:
  from llm_jax.run import plot_distribution
  run = _load_run(args, overrides)
  distribution = run.next_token_distribution(args.prompt, args.top)
  if args.json:
    print(json.dumps({"prompt": args.prompt, "top": [vars(t) for t in distribution.top],
                      "rest": distribution.rest, "rest_count": distribution.rest_count}))
  else:
    print(f"{'rank':>4}  {'id':>6}  {'token':<24}  probability")
    for rank, token in enumerate(distribution.top, 1):
      print(f"{rank:>4}  {token.id:>6}  {repr(token.piece):<24}  {token.probability:.6f}")
    print(f"{'':>4}  {'':>6}  {f'rest ({distribution.rest_count} tokens)':<24}  "
          f"{distribution.rest:.6f}")
  if args.plot:
    plot_distribution(distribution, args.prompt, args.plot)
    print(f"Wrote {args.plot}", file=sys.stderr)


def _eval(args, overrides) -> None:
  run = _load_run(args, overrides)
  result = run.evaluate(args.files, args.max_tokens, args.batch_size)
  if args.json:
    print(json.dumps(result))
    return
  what = args.files or "the validation split"
  print(f"{what}: {result['documents']} documents, {result['tokens']:,} tokens, "
        f"{result['bytes']:,} bytes")
  print(f"loss {result['loss']:.4f}  perplexity {result['perplexity']:.3f}  "
        f"bits per byte {result['bits_per_byte']:.4f}")


def _add_workdir_argument(parser) -> None:
  parser.add_argument("--workdir", required=True, help="run directory of `llm-jax train`")


def _use_fake_cpu_devices(count: int) -> bool:
  """Makes JAX start with `count` fake CPU devices; False if JAX already started with fewer.

  XLA reads the device count when JAX first initialises its backend, so this must run before
  anything imports and uses JAX; the CLI imports it lazily for that reason.
  """
  if "jax" in sys.modules:
    import jax
    return jax.default_backend() == "cpu" and jax.device_count() >= count
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  os.environ["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={count}"])
  os.environ["JAX_PLATFORMS"] = "cpu"
  return True


def _plan(args, overrides) -> None:
  if not _use_fake_cpu_devices(args.devices):
    # JAX is already running here with other devices: plan in a fresh process.
    command = [sys.executable, "-m", "llm_jax.cli", "plan", "--devices", str(args.devices),
               "--mfu", str(args.mfu), *(["--config", args.config] if args.config else []),
               *(["--hardware", args.hardware] if args.hardware else []),
               *(["--json"] if args.json else []),
               *(["--skip_xla_flops"] if args.skip_xla_flops else []),
               *(f"--{o}" for o in overrides)]
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    raise SystemExit(subprocess.run(command, env=env, check=False).returncode)
  from llm_jax import plan
  result = plan.plan(_load_config(args, overrides), args.devices, args.hardware, args.mfu,
                     xla_flops=not args.skip_xla_flops)
  print(json.dumps(result) if args.json else
        plan.format_table(result, args.config or "configs/base.py"))


def _sweep(args, overrides) -> None:
  import jax
  from llm_jax import sweep as sweep_lib
  _no_overrides(overrides)
  sweep = sweep_lib.load_sweep(args.sweep_file)
  sweep_dir = pathlib.Path(args.sweep_dir or sweep_lib.default_sweep_dir(args.sweep_file))
  members = sweep_lib.resolve(sweep, sweep_dir, jax.device_count())
  chosen = sweep_lib.select(members, args.only)
  if args.print_commands:
    command = sweep_lib.tokenizer_command(sweep, sweep_dir)
    if command:
      print(command)
    for member in chosen:
      print(sweep_lib.train_command(member, sweep.base))
    return
  print(sweep_lib.describe(chosen))
  if args.dry_run:
    return
  rows = sweep_lib.run(sweep, members, sweep_dir, args.only)
  failed = [row["name"] for row in rows if row["status"] == "failed"]
  print(f"{sum(row['status'] == 'finished' for row in rows)}/{len(rows)} members finished; "
        f"results in {sweep_dir / 'sweep.jsonl'}", file=sys.stderr)
  if failed:
    raise UserError(f"{len(failed)} sweep members failed ({', '.join(failed)}); see "
                    f"{sweep_dir / 'sweep.jsonl'} for their errors.")


def _scaling_fit(args, overrides) -> None:
  from llm_jax import scaling
  _no_overrides(overrides)
  fits = scaling.fit_and_plot(args.sweep, args.out, args.draws, args.seed, args.loss,
                              args.params, args.overwrite)
  print(scaling.summary(fits))


def _add_sweep_parsers(commands) -> None:
  sweep = commands.add_parser(
      "sweep", help="train every member of a sweep file, one after another (resumable)",
      description="Train the members of configs/sweeps/NAME.py in SWEEP_DIR/<member>; "
                  "finished members are skipped, interrupted ones resume.")
  sweep.add_argument("sweep_file", help="a sweep file defining get_sweep()")
  sweep.add_argument("--sweep_dir", default=None,
                     help="directory of the members' workdirs (default: runs/sweeps/NAME)")
  sweep.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                     help="check every member and print their table; train nothing")
  sweep.add_argument("--only", nargs="+", default=[], metavar="NAME",
                     help="run only these members")
  sweep.add_argument("--print-commands", "--print_commands", dest="print_commands",
                     action="store_true",
                     help="print one `llm-jax train` command per member instead of training")
  sweep.set_defaults(handler=_sweep)

  scaling = commands.add_parser("scaling", help="fit scaling laws to a sweep's results")
  scaling_commands = scaling.add_subparsers(dest="scaling_command", required=True)
  fit = scaling_commands.add_parser(
      "fit", help="IsoFLOP and parametric fits with bootstrap intervals, and their plots",
      description="Fit Chinchilla approaches 2 and 3 to SWEEP_DIR/sweep.jsonl; write "
                  "scaling_fit.json, isoflop.png, optimal.png and parametric.png to --out.")
  fit.add_argument("sweep", help="a sweep directory or its sweep.jsonl")
  fit.add_argument("--out", required=True, help="directory for the fit JSON and plots")
  fit.add_argument("--draws", type=int, default=200, help="bootstrap resamples")
  fit.add_argument("--seed", type=int, default=0, help="seed of the bootstrap")
  fit.add_argument("--loss", default="val_loss", help="row field fitted: val_loss or train_loss")
  fit.add_argument("--params", default="params",
                   help="row field used as N: params or params_non_embedding")
  fit.add_argument("--overwrite", action="store_true", help="replace existing fit outputs")
  fit.set_defaults(handler=_scaling_fit)


def _bench(args, overrides) -> None:
  from llm_jax import bench
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

  generate = commands.add_parser(
      "generate", help="continue prompts with a trained run (text on stdout)",
      description="Continue prompts with the newest checkpoint of a run. Only the generated "
      "text goes to stdout (several texts are separated by a blank line, or use --jsonl); "
      "progress goes to stderr. A prompt is refused, not truncated, when it leaves no room "
      "for --max_new_tokens in the context. --config.mesh.KEY=VALUE picks the mesh.")
  _add_workdir_argument(generate)
  prompt = generate.add_mutually_exclusive_group(required=True)
  prompt.add_argument("--prompt", help="text to continue")
  prompt.add_argument("--prompt_file", help="one prompt per line (.jsonl: a JSON string or "
                      '{"prompt": ...} per line)')
  generate.add_argument("--max_new_tokens", type=int, default=None,
                        help="new tokens at most (default: the rest of the context, <= 256)")
  generate.add_argument("--temperature", type=float, default=0.0,
                        help="0 is greedy (default); higher samples more freely")
  generate.add_argument("--top_k", type=int, default=None,
                        help="sample only among the k most likely tokens")
  generate.add_argument("--top_p", type=float, default=1.0,
                        help="sample only within the smallest set of mass >= p (nucleus)")
  generate.add_argument("--beams", type=int, default=1, help="beam search with this many beams")
  generate.add_argument("--length_penalty", type=float, default=1.0,
                        help="beams rank by log-prob / length**this (0: total log-prob)")
  generate.add_argument("--num_samples", type=int, default=1,
                        help="texts per prompt (samples, or the best beams)")
  generate.add_argument("--seed", type=int, default=0, help="seed of the sampling")
  generate.add_argument("--batch_size", type=int, default=16, help="rows decoded at once")
  generate.add_argument("--echo", action="store_true", help="print each prompt before its text")
  generate.add_argument("--jsonl", action="store_true",
                        help="one JSON object per text: prompt_index, sample, prompt, text")
  generate.set_defaults(handler=_generate)

  predict = commands.add_parser(
      "predict", help="the next-token probability distribution after a prompt",
      description="Print the most likely next tokens after a prompt with their "
      "probabilities, and the probability mass of all the others.")
  _add_workdir_argument(predict)
  predict.add_argument("--prompt", required=True, help="text whose next token to predict")
  predict.add_argument("--top", type=int, default=10, help="tokens to list")
  predict.add_argument("--plot", default=None, help="also save a bar chart as this PNG")
  predict.add_argument("--json", action="store_true", help="print one JSON object")
  predict.set_defaults(handler=_predict)

  evaluate = commands.add_parser(
      "eval", help="loss, perplexity and bits per byte of a trained run",
      description="Score the run's validation split (or --files) with the newest checkpoint: "
      "mean next-token loss, perplexity and bits per byte, with the tokens scored.")
  _add_workdir_argument(evaluate)
  evaluate.add_argument("--files", default=None,
                        help="glob of files to score instead (quote it; .jsonl: one document "
                        "per line)")
  evaluate.add_argument("--max_tokens", type=int, default=0,
                        help="stop after the document that reaches this many tokens (0: all)")
  evaluate.add_argument("--batch_size", type=int, default=None,
                        help="rows scored at once (default: the run's train.batch_size)")
  evaluate.add_argument("--json", action="store_true", help="print one JSON object")
  evaluate.set_defaults(handler=_eval)

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
  plan = commands.add_parser(
      "plan", help="compile the train step for N fake devices: size, memory, FLOPs, speed",
      description="Compile the real train step ahead of time for a mesh of N devices (fake "
      "CPU devices, no parameters materialised) and print parameters, FLOPs, per-device memory, "
      "fit and speed on a named accelerator.")
  _add_config_arguments(plan)
  plan.add_argument("--devices", type=int, required=True, help="devices of the target mesh")
  plan.add_argument("--hardware", default=None,
                    help="accelerator to check fit and speed against, e.g. h100, tpu-v5p")
  plan.add_argument("--mfu", type=float, default=0.4,
                    help="model FLOPs utilisation assumed for step time and tokens/s")
  plan.add_argument("--skip_xla_flops", action="store_true",
                    help="skip the two small extra compiles that count XLA's FLOPs")
  plan.add_argument("--json", action="store_true", help="print one JSON object")
  plan.set_defaults(handler=_plan)
  _add_sweep_parsers(commands)

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
  if argv is None:  # the `llm-jax` command itself, not a call from Python
    host_memory.reexec_with_tuned_malloc()
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
