"""`llm-jax train`."""

from llm_jax.cli import common


def _train(args, overrides) -> None:
  from llm_jax.parallel import distributed
  config = common.load_config(args, overrides)
  distributed.initialize(config.distributed)  # before anything else uses JAX
  from llm_jax.train.loop import train
  train(config, args.workdir)


def add_commands(commands) -> None:
  train = commands.add_parser(
      "train", help="train a model (resumes if WORKDIR has checkpoints)",
      description="Train a model; config values are overridden with --config.KEY=VALUE.")
  common.add_config_argument(train)
  train.add_argument("--workdir", default="runs/default",
                     help="run directory: config, tokenizer, metrics, checkpoints")
  train.set_defaults(handler=_train)
