"""Direct Preference Optimization (Rafailov et al. 2023): the policy learns from preference
pairs directly, held near a reference model by β:

    loss = -log σ(β [(log π(c) − log π_ref(c)) − (log π(r) − log π_ref(r))])

with log π(·) the summed log-probability of a response's tokens (and its end of turn). The
reference is the `train.init_from` model; its log-probabilities of every pair are computed
once before training (`llm_jax.posttrain.dpo_reference`) and arrive in each batch as
`ref_chosen_log_prob` and `ref_rejected_log_prob`, so training holds one model, not two.

Metrics per pair: the implicit rewards β(log π − log π_ref) of both sides, their margin,
accuracy (margin > 0), and the policy's log-probabilities of both sides.
"""

import functools

import jax
import jax.numpy as jnp

from llm_jax.objectives import Objective
from llm_jax.objectives.pairs import pair_batch_layout, pair_count, sequence_log_probs

REFERENCE_ARRAYS = {"ref_chosen_log_prob": ("float32", ("batch",)),
                    "ref_rejected_log_prob": ("float32", ("batch",))}


def _summed_loss(model, params, batch, *, beta: float):
  chosen, rejected = sequence_log_probs(model, params, batch)
  reward_chosen = beta * (chosen - batch["ref_chosen_log_prob"])
  reward_rejected = beta * (rejected - batch["ref_rejected_log_prob"])
  margin, valid = reward_chosen - reward_rejected, batch["valid"]
  metrics = {"reward_chosen": reward_chosen, "reward_rejected": reward_rejected,
             "margin": margin, "accuracy": (margin > 0).astype(jnp.float32),
             "log_prob_chosen": chosen, "log_prob_rejected": rejected}
  return (jnp.sum(-jax.nn.log_sigmoid(margin) * valid),
          {k: jnp.sum(v * valid) for k, v in metrics.items()})


def dpo_objective(beta: float = 0.1) -> Objective:
  return Objective(name="dpo", loss=functools.partial(_summed_loss, beta=beta),
                   weight=pair_count, batch=pair_batch_layout(**REFERENCE_ARRAYS),
                   weight_name="pairs", rows_per_example=2)
