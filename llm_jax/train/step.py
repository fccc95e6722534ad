"""The one train step: any objective, gradient accumulation, clipping, the non-finite guard.

The objective (`llm_jax.objectives.Objective`) gives the loss summed over a batch and the
weight it is divided by (e.g. target tokens), taken over the whole global batch: with
gradient accumulation each microbatch's summed loss is divided by the global weight, so
accumulating A microbatches gives exactly the gradient of the full batch.

A step whose loss or gradient norm is NaN or infinite changes nothing but the step counter
and the count of skipped steps.
"""

import functools

import jax
import jax.numpy as jnp
import optax

from llm_jax.train.state import TrainState


def _microbatches(batch, count: int):
  # Row i of microbatch j is row i*count + j: each device keeps its own rows, no reshuffle.
  def split(x):
    return jnp.swapaxes(x.reshape(x.shape[0] // count, count, *x.shape[1:]), 0, 1)
  return jax.tree.map(split, batch)


def _whole(micro):
  """The batch `_microbatches` split, back in its row order."""
  return jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1).reshape(-1, *x.shape[2:]), micro)


def train_step(state: TrainState, batch, reference, *, objective, model, tx, schedule,
               grad_accum_steps: int):
  """(new state, metrics): `loss`, the objective's metrics and weight, `grad_norm`,
  `learning_rate`, `nonfinite` and `skipped_steps`.

  An objective of several `passes` makes that many updates on the batch (the metrics are
  their means; a non-finite loss or gradient in any pass leaves the state as it was before
  the first); the step counter advances by one, the optimizer's schedule by `passes`.
  `prepare` runs once per step, a microbatch at a time under gradient accumulation, with the
  `reference` parameters (None unless the objective asks for them).
  """
  if objective.prepare is not None:
    def prepare(micro):
      return objective.prepare(model, state.params, micro, reference)
    batch = (prepare(batch) if grad_accum_steps == 1 else
             _whole(jax.lax.map(prepare, _microbatches(batch, grad_accum_steps))))
  weight = jnp.maximum(objective.weight(batch), 1.0)

  def loss_fn(params, micro):
    loss_sum, metric_sums = objective.loss(model, params, micro)
    return loss_sum / weight, metric_sums

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def update(carry, _):
    params, opt_state = carry
    if grad_accum_steps == 1:
      (loss, metric_sums), grads = grad_fn(params, batch)
    else:
      micro = _microbatches(batch, grad_accum_steps)

      def accumulate(total, one):
        return jax.tree.map(jnp.add, total, grad_fn(params, one)), None
      first = jax.tree.map(lambda x: x[0], micro)
      zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                           jax.eval_shape(grad_fn, params, first))
      ((loss, metric_sums), grads), _ = jax.lax.scan(accumulate, zeros, micro)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, opt_state = tx.update(grads, opt_state, params)
    return ((optax.apply_updates(params, updates), opt_state),
            (loss, metric_sums, grad_norm, finite))

  carry = (state.params, state.opt_state)
  if objective.passes == 1:
    (params, opt_state), (loss, metric_sums, grad_norm, finite) = update(carry, None)
  else:
    (params, opt_state), per_pass = jax.lax.scan(update, carry, length=objective.passes)
    loss, metric_sums, grad_norm, _ = jax.tree.map(jnp.mean, per_pass)
    finite = jnp.all(per_pass[3])
  # A non-finite step leaves parameters and optimizer state as they were; the loop then skips
  # on or stops (train.on_nonfinite). The step counter still advances past the batch.
  keep_finite = functools.partial(jax.tree.map, lambda new, old: jnp.where(finite, new, old))
  new_state = TrainState(step=state.step + 1, params=keep_finite(params, state.params),
                         opt_state=keep_finite(opt_state, state.opt_state),
                         skipped=state.skipped + (~finite).astype(jnp.int32))
  metrics = {
      "loss": loss,
      **{name: total / weight for name, total in metric_sums.items()},
      objective.weight_name: weight,
      "grad_norm": grad_norm,
      "learning_rate": schedule(state.step * objective.passes),
      "nonfinite": ~finite,
      "skipped_steps": new_state.skipped,
  }
  return new_state, metrics
