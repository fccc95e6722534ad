"""`llm-jax <command>`: parses arguments, validates, calls library functions. Nothing else.

Bad input raises `UserError`; it is printed as one line and the process exits with status 2.
"""

import argparse
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


def _train(args, overrides) -> None:
  from llm_jax import config as config_lib
  from llm_jax.train.loop import train
  config = config_lib.load_config(args.config, overrides)
  train(config, args.workdir)


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="llm-jax", description=__doc__.splitlines()[0])
  commands = parser.add_subparsers(dest="command", required=True)
  train = commands.add_parser(
      "train", help="train a model (resumes if WORKDIR has checkpoints)",
      description="Train a model; config values are overridden with --config.KEY=VALUE.")
  train.add_argument("--config", default=None,
                     help="config file PATH.py[:variant] (default: configs/base.py)")
  train.add_argument("--workdir", default="runs/default",
                     help="run directory: config, tokenizer, metrics, checkpoints")
  train.set_defaults(handler=_train)
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
