"""Training objectives: what a step minimises and what its batch holds.

An `Objective` is a value. The one train step (`llm_jax.train.step`) and evaluation take any
objective; nothing else in the trainer knows which one it runs. Each objective lives in a
module of its own here (`next_token` for pretraining and supervised fine-tuning, `reward_model`,
`dpo`, `grpo`), all reading the model through `log_probs`. Objectives are pure: they read no
files, checkpoints or data sources (`llm_jax.train.recipes` pairs each with its batch source).
"""

import dataclasses
import functools
from collections.abc import Callable, Mapping

import jax
import numpy as np


@dataclasses.dataclass(frozen=True, eq=False)  # one value each, compared and hashed by identity
class Objective:
  """What a train step minimises.

  `loss(model, params, batch)` returns `(loss_sum, metric_sums)`: the loss summed
  over the batch's examples, and a dict of further per-example quantities summed the same
  way. `weight(batch)` is what those sums are divided by (target tokens, pairs), computed on
  the whole global batch, so that gradient accumulation over microbatches gives exactly the
  gradient of the full batch; it is logged as `weight_name`. `batch` names the arrays a batch
  holds, with their dtypes and logical axes (`batch`, `length`, ...).
  `perplexity`: the loss is a mean next-token cross-entropy, so exp(loss) is reported.
  `rows_per_example`: sequences of `length` a batch row stands for (2 for a preference pair),
  so that tokens/s and MFU count what the step computes.
  `prepare(model, params, batch, reference)`, if given, returns the batch with arrays the loss
  needs computed once per step from the parameters before any update (GRPO's reference and
  rollout-policy log-probabilities); `reference` is the parameters of the model the run
  started from (`train.init_from`), frozen, when the objective asks for them (`reference`),
  else None. `passes` is the number of optimizer updates a step makes on its batch (GRPO's mu).
  """
  name: str
  loss: Callable
  weight: Callable
  batch: Mapping[str, tuple[str, tuple[str, ...]]]
  weight_name: str = "weight"
  perplexity: bool = False
  rows_per_example: int = 1
  prepare: Callable | None = None
  passes: int = 1
  reference: bool = False

  def abstract_batch(self, sizes: Mapping[str, int]) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes of a batch, from the size of each logical axis (e.g. batch, length)."""
    return {name: jax.ShapeDtypeStruct(tuple(sizes[a] for a in axes), np.dtype(dtype))
            for name, (dtype, axes) in self.batch.items()}


@functools.partial(jax.jit, static_argnames=("objective", "model"))
def evaluate_batch(params, batch, *, objective: Objective, model):
  """(loss sum, weight, metric sums) of one batch: what evaluation adds up over a set.

  One jitted function for training's periodic evaluation and for scoring (`llm_jax.inference.evaluate`),
  compiled once per objective, model and batch shape.
  """
  loss_sum, metric_sums = objective.loss(model, params, batch)
  return loss_sum, objective.weight(batch), metric_sums
