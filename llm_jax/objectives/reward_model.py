"""A reward model: the transformer with a scalar head (`model.reward_head`), scored at the last
token of a response, trained on preference pairs with the Bradley-Terry loss

    loss = -log σ(r_chosen − r_rejected) + c · (r_chosen + r_rejected)²

where the optional penalty (`objective.reward_centering` = c, as TRL's
`center_rewards_coefficient`) keeps rewards centred at zero, since the loss alone sees only
their differences. Metrics per pair: accuracy (r_chosen > r_rejected), margin and both rewards.
"""

import functools

import jax
import jax.numpy as jnp

from llm_jax.objectives import Objective
from llm_jax.objectives.pairs import (both_sides, last_response_position, pair_batch_layout,
                                      pair_count, split_sides)


def response_rewards(model, params, inputs_BT, weights_BT):
  """The reward [B] of each row: the head's score at its last response token."""
  rewards_BT = model.apply({"params": params}, inputs_BT)
  index_B = last_response_position(weights_BT)
  return jnp.take_along_axis(rewards_BT, index_B[:, None], axis=1)[:, 0]


def _summed_loss(model, params, batch, *, centering: float):
  rewards = response_rewards(model, params, both_sides(batch, "inputs"),
                             both_sides(batch, "weights"))
  chosen, rejected = split_sides(rewards)
  margin, valid = chosen - rejected, batch["valid"]
  losses = -jax.nn.log_sigmoid(margin) + centering * jnp.square(chosen + rejected)
  metrics = {"accuracy": (margin > 0).astype(jnp.float32), "margin": margin,
             "reward_chosen": chosen, "reward_rejected": rejected}
  return jnp.sum(losses * valid), {k: jnp.sum(v * valid) for k, v in metrics.items()}


def reward_objective(centering: float = 0.0) -> Objective:
  return Objective(name="reward", loss=functools.partial(_summed_loss, centering=centering),
                   weight=pair_count, batch=pair_batch_layout(), weight_name="pairs",
                   rows_per_example=2)
