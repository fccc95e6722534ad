"""What the preference objectives share: a batch of (chosen, rejected) pairs, each side its own
row, and the per-sequence quantities read from one forward pass over both sides.

A batch holds, for each side (`chosen_`, `rejected_`), `inputs`, `targets` and `weights`
[B, T] (weights mark the response's targets; `llm_jax.data.preferences`) and `valid` [B]
(0 for the padding pairs of an evaluation batch). The two sides of a pair are separate rows,
so a response never attends to its twin.
"""

import jax.numpy as jnp

from llm_jax.objectives.log_probs import token_log_probs

SIDES = ("chosen", "rejected")
_TOKENS = ("batch", "length")


def pair_batch_layout(**extra) -> dict:
  """The arrays of a pair batch (dtype, logical axes), with `extra` ones of the objective."""
  arrays = {"valid": ("float32", ("batch",))}
  for side in SIDES:
    arrays |= {f"{side}_inputs": ("int32", _TOKENS), f"{side}_targets": ("int32", _TOKENS),
               f"{side}_weights": ("float32", _TOKENS)}
  return arrays | extra


def both_sides(batch, name: str):
  """The `name` arrays of both sides stacked as 2B rows: chosen rows, then rejected rows."""
  return jnp.concatenate([batch[f"chosen_{name}"], batch[f"rejected_{name}"]])


def split_sides(x_2B):
  """(chosen [B], rejected [B]) of a value computed on `both_sides` rows."""
  return jnp.split(x_2B, 2)


def last_response_position(weights_BT):
  """The position [B] of each row's last response token, where a reward is read: the last
  weighted target's index + 1 (0 for a row without one)."""
  T = weights_BT.shape[1]
  return jnp.max(jnp.where(weights_BT > 0, jnp.arange(T), -1), axis=1) + 1


def sequence_log_probs(model, params, batch):
  """(chosen, rejected) summed log-probabilities [B] of the response tokens of each side,
  from one forward pass over both sides' rows."""
  log_probs_BT = token_log_probs(model, params, both_sides(batch, "inputs"),
                                 both_sides(batch, "targets"))
  return split_sides(jnp.sum(log_probs_BT * both_sides(batch, "weights"), axis=1))


def pair_count(batch):
  return jnp.sum(batch["valid"])
