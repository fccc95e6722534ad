"""Next-token prediction: pretraining, and supervised fine-tuning (targets on some tokens).

A batch holds `inputs`, `targets`, `segment_ids`, `positions` and `weights` ([B, T] each);
a target counts when its weight is 1 (a real next token inside its own document, or an
assistant's token). The loss is the mean cross-entropy over counted targets.
"""

import jax.numpy as jnp

from llm_jax.objectives import Objective
from llm_jax.objectives.log_probs import token_log_probs

_TOKENS = ("batch", "length")


def summed_loss(model, params, batch):
  """(sum of per-token cross-entropies in nats over weighted targets, no further metrics)."""
  log_probs_BT = token_log_probs(model, params, batch["inputs"], batch["targets"],
                                 batch["segment_ids"], batch["positions"])
  return -jnp.sum(log_probs_BT * batch["weights"]), {}


def target_count(batch):
  return jnp.sum(batch["weights"])


NEXT_TOKEN = Objective(
    name="next_token", loss=summed_loss, weight=target_count, weight_name="target_tokens",
    perplexity=True,
    batch={"inputs": ("int32", _TOKENS), "targets": ("int32", _TOKENS),
           "segment_ids": ("int32", _TOKENS), "positions": ("int32", _TOKENS),
           "weights": ("float32", _TOKENS)})
