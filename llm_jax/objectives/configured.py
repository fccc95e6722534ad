"""The objective `objective.name` names, with the batch source it trains on."""

from llm_jax.data.batches import preference_batches, text_batches
from llm_jax.objectives import Objective
from llm_jax.objectives.dpo import dpo_objective
from llm_jax.objectives.next_token import NEXT_TOKEN
from llm_jax.objectives.reference import dpo_batches
from llm_jax.objectives.reward import reward_objective


def configured(config) -> tuple[Objective, callable]:
  """(objective, batch_source(config, workdir, inherited_tokenizer)) of `config`."""
  o = config.objective
  if o.name == "reward":
    return reward_objective(o.reward_centering), preference_batches
  if o.name == "dpo":
    return dpo_objective(o.dpo_beta), dpo_batches
  return NEXT_TOKEN, text_batches
