"""`llm-jax <command>`: parses arguments, validates, calls library functions. Nothing else.

Bad input raises `UserError`; it is printed as one line and the process exits with status 2.
Each module here adds one group of commands; they import JAX and the library only inside
their handlers, so `--help` stays fast and `plan` can set XLA_FLAGS before JAX starts.
"""

import argparse
import re
import sys

from llm_jax.parallel import host_memory
from llm_jax.cli import common, data, hf, inference, study, tokenizer, train
from llm_jax.errors import UserError


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="llm-jax", description=__doc__.splitlines()[0])
  commands = parser.add_subparsers(dest="command", required=True)
  for group in (train, tokenizer, inference, data, study, hf):
    group.add_commands(commands)
  return parser


def main(argv: list[str] | None = None) -> int:
  if argv is None:  # the `llm-jax` command itself, not a call from Python
    host_memory.reexec_with_tuned_malloc()
    argv = sys.argv[1:]
  args, extra = build_parser().parse_known_args(argv)
  args.argv = argv  # `plan` runs the same command again in a fresh process
  try:
    args.handler(args, common.split_overrides(extra))
  except UserError as e:
    print(f"llm-jax: error: {_as_flags(str(e), argv)}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print("llm-jax: interrupted", file=sys.stderr)
    return 130
  return 0


def _as_flags(message: str, argv: list[str]) -> str:
  """A library message naming a parameter the command line set as a flag (`top=0`) names the
  flag instead (`--top=0`)."""
  flags = {arg[2:].partition("=")[0] for arg in argv if arg.startswith("--")}
  for name in flags - {"config"}:
    message = re.sub(rf"(?<![\w.\-']){re.escape(name)}=", f"--{name}=", message)
  return message
