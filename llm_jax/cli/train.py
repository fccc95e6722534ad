"""`llm-jax train`."""

from llm_jax.cli import common


def _train(args, overrides) -> None:
  from llm_jax.parallel import distributed
  config = common.load_config(args, overrides)
  distributed.initialize(config.distributed)  # before anything else uses JAX
  from llm_jax.train.loop import train
  train(config, args.workdir)
  sample = end_of_run_sample(config, args.workdir)
  if sample is not None and distributed.is_primary():
    print(f"--- sample (temperature {config.train.sample_temperature}) ---\n{sample}\n---",
          flush=True)


def end_of_run_sample(config, workdir) -> str | None:
  """`train.sample_prompt` continued by the finished run's model (answered, when the run
  learns from conversations, pairs or prompts), to eyeball its result; None without
  `train.sample_tokens`, for a reward model, or for a run stopped before its last step. Every
  process takes part: the parameters may span all of them."""
  from llm_jax.data import sources
  from llm_jax.inference.run import load_run
  t = config.train
  if not t.sample_tokens or config.model.reward_head:
    return None
  run = load_run(workdir)
  if run.step != t.steps:
    return None
  specs = ([spec for spec, _ in sources.parse_mixture(config.data.mixture)]
           if config.data.mixture else [config.data.source])
  chat = any(spec.startswith(("chat:", "preferences:", "prompts:")) for spec in specs)
  prompt_ids = (run.chat_format.prompt([{"role": "user", "content": t.sample_prompt}]) if chat
                else run.encode_prompt(t.sample_prompt))
  room = min(t.sample_tokens, run.model.config.context_length - len(prompt_ids))
  text = run.generate(t.sample_prompt, room, temperature=t.sample_temperature, seed=t.seed,
                      chat=chat)[0][0] if room > 0 else ""
  return (f"user: {t.sample_prompt}\nassistant: " if chat else t.sample_prompt) + text


def add_commands(commands) -> None:
  train = commands.add_parser(
      "train", help="train a model (resumes if WORKDIR has checkpoints)",
      description="Train a model; config values are overridden with --config.KEY=VALUE.")
  common.add_config_argument(train)
  train.add_argument("--workdir", default="runs/default",
                     help="run directory: config, tokenizer, metrics, checkpoints")
  train.set_defaults(handler=_train)
