"""What `objective.name` trains: the objective, and the batch source it trains on."""

from collections.abc import Callable

from llm_jax.data.batches import text_batches
from llm_jax.objectives import Objective
from llm_jax.objectives.dpo import dpo_objective
from llm_jax.objectives.grpo import grpo_objective
from llm_jax.objectives.next_token import NEXT_TOKEN
from llm_jax.objectives.reward_model import reward_objective
from llm_jax.posttrain.dpo_reference import dpo_batches
from llm_jax.posttrain.pairs import preference_batches
from llm_jax.posttrain.rollouts import grpo_batches


def configured(config) -> tuple[Objective, Callable]:
  """(objective, batch_source(config, workdir, inherited_tokenizer)) of `config`: what
  `llm_jax.train.loop.train` takes."""
  o, r = config.objective, config.rl
  if o.name == "reward":
    return reward_objective(o.reward_centering), preference_batches
  if o.name == "dpo":
    return dpo_objective(o.dpo_beta), dpo_batches
  if o.name == "grpo":
    return grpo_objective(r.clip_epsilon, r.kl_beta, r.passes, r.temperature), grpo_batches
  return NEXT_TOKEN, text_batches
