"""The next-token loss, shared by training, evaluation and scoring (one copy of it)."""

import jax.numpy as jnp
import optax

from llm_jax.model import Transformer


def summed_loss(params, model: Transformer, batch):
  """(sum of per-token cross-entropies in nats, number of weighted tokens) over `batch`.

  `batch` holds `inputs`, `targets`, `segment_ids`, `positions` and `weights` ([B, T] each);
  a target counts when its weight is 1 (a real next token inside its own document).
  """
  logits_BTV = model.apply({"params": params}, batch["inputs"], batch["segment_ids"],
                           batch["positions"])
  losses_BT = optax.softmax_cross_entropy_with_integer_labels(
      logits_BTV.astype(jnp.float32), batch["targets"])
  return jnp.sum(losses_BT * batch["weights"]), jnp.sum(batch["weights"])
