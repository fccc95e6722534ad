"""The one per-token log-probability of targets, for every objective that reads the language
model's distribution (next-token, pairs, GRPO): a change to how logits are computed lands here."""

import jax.numpy as jnp
import optax


def token_log_probs(model, params, inputs_BT, targets_BT, segment_ids_BT=None,
                    positions_BT=None, temperature: float = 1.0):
  """[B, T] float32 log-probability of each target under softmax(logits / temperature)."""
  logits_BTV = model.apply({"params": params}, inputs_BT, segment_ids_BT, positions_BT)
  logits_BTV = logits_BTV.astype(jnp.float32)
  if temperature != 1.0:
    logits_BTV = logits_BTV / temperature
  return -optax.softmax_cross_entropy_with_integer_labels(logits_BTV, targets_BT)
