"""Pure train and eval steps, jitted with the state's and the batch's shardings.

A step whose loss or gradient norm is NaN or infinite changes nothing but the step counter
and the count of skipped steps.

The loss is the mean next-token cross-entropy over tokens with weight 1 (real targets inside
their own document), taken over the whole global batch: with gradient accumulation each
microbatch's summed loss is divided by the global token count, so accumulating A
microbatches gives exactly the gradient of the full batch.
"""

import functools

import jax
import jax.numpy as jnp
import optax

from llm_jax import sharding
from llm_jax.loss import summed_loss
from llm_jax.model import Transformer
from llm_jax.train.state import TrainState, state_shardings


def _microbatches(batch, count: int):
  # Row i of microbatch j is row i*count + j: each device keeps its own rows, no reshuffle.
  def split(x):
    return jnp.swapaxes(x.reshape(x.shape[0] // count, count, *x.shape[1:]), 0, 1)
  return jax.tree.map(split, batch)


def train_step(state: TrainState, batch, *, model, tx, schedule, grad_accum_steps: int):
  total_tokens = jnp.maximum(jnp.sum(batch["weights"]), 1.0)

  def loss_fn(params, micro):
    loss_sum, _ = summed_loss(params, model, micro)
    return loss_sum / total_tokens

  grad_fn = jax.value_and_grad(loss_fn)
  if grad_accum_steps == 1:
    loss, grads = grad_fn(state.params, batch)
  else:
    def accumulate(carry, micro):
      loss, grads = grad_fn(state.params, micro)
      return jax.tree.map(jnp.add, carry, (loss, grads)), None
    zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, state.params))
    (loss, grads), _ = jax.lax.scan(accumulate, zeros, _microbatches(batch, grad_accum_steps))

  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  # A non-finite step leaves parameters and optimizer state as they were; the loop then
  # skips on or stops (train.on_nonfinite). The step counter still advances past the batch.
  keep_finite = functools.partial(jax.tree.map, lambda new, old: jnp.where(finite, new, old))
  new_state = TrainState(step=state.step + 1, params=keep_finite(params, state.params),
                         opt_state=keep_finite(opt_state, state.opt_state),
                         skipped=state.skipped + (~finite).astype(jnp.int32))
  metrics = {
      "loss": loss,
      "grad_norm": grad_norm,
      "learning_rate": schedule(state.step),
      "tokens": total_tokens,
      "nonfinite": ~finite,
      "skipped_steps": new_state.skipped,
  }
  return new_state, metrics


def eval_step(params, batch, *, model):
  return summed_loss(params, model, batch)


def compile_steps(model: Transformer, tx, schedule, mesh, grad_accum_steps: int):
  """Jitted (train_step, eval_step) with explicit shardings; the train state is donated."""
  _, state_sh = state_shardings(model, tx, mesh)
  batch_sh = sharding.batch_sharding(mesh)
  replicated = sharding.replicated(mesh)
  train = jax.jit(
      functools.partial(train_step, model=model, tx=tx, schedule=schedule,
                        grad_accum_steps=grad_accum_steps),
      in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, replicated),
      donate_argnums=0)
  evaluate = jax.jit(functools.partial(eval_step, model=model),
                     in_shardings=(state_sh.params, batch_sh), out_shardings=replicated)
  return train, evaluate
