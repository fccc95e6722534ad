"""Group Relative Policy Optimization (Shao et al. 2024): the policy learns from its own
answers, each judged against the other answers to the same prompt, with no value network.

Each prompt of a step gets G completions (`llm_jax.posttrain.rollouts`); their rewards r give
each completion the advantage

    A = (r - mean of its group) / (std of its group + ADVANTAGE_EPSILON)

(the sample standard deviation, as TRL computes it). For each completion token, with ρ the
ratio of its probability under the policy to that under the rollout policy,

    loss = -min(ρ A, clip(ρ, 1 - ε, 1 + ε) A) + β k3,
    k3 = e^(ref - log π) - (ref - log π) - 1

k3 being Schulman's unbiased, positive estimator of KL(π || reference) at that token, `ref`
the token's log-probability under the reference (the `train.init_from` model, frozen). The
loss is summed over every completion token of the batch and divided by their number (losses
normalised per token). A group whose rewards are all equal has A = 0: only its KL term moves
the policy.

Log-probabilities are those of the distribution the rollouts are sampled from, the logits
divided by `rl.temperature` (as TRL does; `rl.top_p`'s truncation is not modelled), for the
policy, the rollout policy and the reference alike.

With one pass per batch the rollout policy is the policy itself: its log-probabilities are the
policy's own with the gradient stopped, so ρ is exactly 1 and the gradient is the plain
policy gradient. With several passes (μ), they are computed once, before the first update, in
the step's `prepare`, as are the reference's.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from llm_jax.objectives import Objective
from llm_jax.objectives.log_probs import token_log_probs

ADVANTAGE_EPSILON = 1e-4
_TOKENS = ("batch", "length")
BATCH = {"inputs": ("int32", _TOKENS), "targets": ("int32", _TOKENS),
         "weights": ("float32", _TOKENS), "advantages": ("float32", ("batch",))}


def group_advantages(rewards: np.ndarray, group_size: int) -> np.ndarray:
  """Each reward's advantage within its group: rows [g * G, (g + 1) * G) answer one prompt."""
  groups = np.asarray(rewards, np.float64).reshape(-1, group_size)
  centred = groups - groups.mean(axis=1, keepdims=True)
  return (centred / (groups.std(axis=1, ddof=1, keepdims=True) + ADVANTAGE_EPSILON)
          ).reshape(-1).astype(np.float32)


def _log_probs(model, params, batch, temperature: float):
  """[B, T] log-probability of each target token of the distribution the rollouts sample."""
  return token_log_probs(model, params, batch["inputs"], batch["targets"],
                         temperature=temperature)


def token_losses(log_probs, old_log_probs, ref_log_probs, advantages_B, *, epsilon: float,
                 beta: float):
  """Per-token (loss, k3 KL or None, clipped) [B, T] of the formula in the module docstring;
  `clipped` marks tokens whose clipped term is the one taken and does not depend on the
  policy (ratio past 1 + ε with A > 0, or below 1 - ε with A < 0): they give no gradient."""
  ratio = jnp.exp(log_probs - old_log_probs)
  advantages = advantages_B[:, None]
  losses = -jnp.minimum(ratio * advantages,
                        jnp.clip(ratio, 1 - epsilon, 1 + epsilon) * advantages)
  clipped = (((ratio > 1 + epsilon) & (advantages > 0)) |
             ((ratio < 1 - epsilon) & (advantages < 0)))
  if ref_log_probs is None:
    return losses, None, clipped
  log_ratio = ref_log_probs - log_probs
  kl = jnp.exp(log_ratio) - log_ratio - 1
  return losses + beta * kl, kl, clipped


def _summed_loss(model, params, batch, *, epsilon: float, beta: float, temperature: float):
  log_probs = _log_probs(model, params, batch, temperature)
  old = batch.get("old_log_probs", jax.lax.stop_gradient(log_probs))
  losses, kl, clipped = token_losses(log_probs, old, batch.get("ref_log_probs"),
                                     batch["advantages"], epsilon=epsilon, beta=beta)
  weights = batch["weights"]
  metrics = {"clip_fraction": jnp.sum(clipped * weights)}
  if kl is not None:
    metrics["kl"] = jnp.sum(kl * weights)
  return jnp.sum(losses * weights), metrics


def _prepare(model, params, batch, reference, *, passes: int, temperature: float):
  """The reference's and, with several passes, the rollout policy's log-probabilities, once
  per step before any update."""
  batch = dict(batch)
  if reference is not None:
    batch["ref_log_probs"] = jax.lax.stop_gradient(
        _log_probs(model, reference, batch, temperature))
  if passes > 1:
    batch["old_log_probs"] = jax.lax.stop_gradient(
        _log_probs(model, params, batch, temperature))
  return batch


def completion_tokens(batch):
  return jnp.sum(batch["weights"])


def grpo_objective(epsilon: float = 0.2, beta: float = 0.04, passes: int = 1,
                   temperature: float = 1.0) -> Objective:
  """GRPO's objective for rollouts sampled at `temperature`; with `beta` > 0 its step reads the
  reference: the parameters of the run it starts from."""
  needs_prepare = beta > 0 or passes > 1
  prepare = functools.partial(_prepare, passes=passes, temperature=temperature)
  return Objective(name="grpo", loss=functools.partial(_summed_loss, epsilon=epsilon, beta=beta,
                                                       temperature=temperature),
                   weight=completion_tokens, batch=BATCH, weight_name="completion_tokens",
                   prepare=prepare if needs_prepare else None, passes=passes,
                   reference=beta > 0)

