"""What the command groups share: config overrides, common arguments, and options passed
through to the library.

Options whose default belongs to the config or to a library function are declared without
one (None): `given` and `as_overrides` pass on only those given, so that default applies.
"""

from llm_jax.errors import UserError


def split_overrides(extra: list[str]) -> list[str]:
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


def no_overrides(overrides) -> None:
  if overrides:
    raise UserError(f"This command takes no config overrides (got {overrides[0]!r}).")


def load_config(args, overrides):
  from llm_jax import config as config_lib
  return config_lib.load_config(args.config, overrides)


def add_config_argument(parser) -> None:
  parser.add_argument("--config", default=None,
                      help="config file PATH.py[:variant] (default: configs/base.py)")


def add_workdir_argument(parser) -> None:
  parser.add_argument("--workdir", required=True, help="run directory of `llm-jax train`")


def given(args, *options: str) -> dict:
  """{option: value} of the `options` given on the command line, as keyword arguments."""
  return {o: getattr(args, o) for o in options if getattr(args, o) is not None}


def as_overrides(args, keys: dict[str, str]) -> list[str]:
  """`KEY=VALUE` config overrides of the options given, for `keys` {option: config key}."""
  return [f"{keys[option]}={value}" for option, value in given(args, *keys).items()]
