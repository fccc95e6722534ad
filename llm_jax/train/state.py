"""The train state pytree and its sharded initialisation.

Shardings come from the model's logical axis names: parameters carry them from
`nn.with_logical_partitioning`, and optimizer-state leaves that mirror a parameter take the
parameter's names (`optax.tree_map_params`); scalars such as Adam's count are replicated.
"""

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec

from llm_jax.parallel import sharding


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # batches consumed
  params: dict
  opt_state: optax.OptState
  skipped: jax.Array  # steps whose update was dropped for a non-finite loss or gradient


def state_logical_specs(model, tx: optax.GradientTransformation):
  """(abstract TrainState, pytree of logical PartitionSpecs of the same structure)."""
  params, param_specs = sharding.logical_params(model)
  opt_state = jax.eval_shape(tx.init, params)
  opt_specs = optax.tree_map_params(
      tx, lambda _, spec: spec, opt_state, param_specs,
      transform_non_params=lambda _: PartitionSpec(),
      is_leaf=lambda x: isinstance(x, PartitionSpec))
  scalar = jax.ShapeDtypeStruct((), jnp.int32)
  abstract = TrainState(step=scalar, params=params, opt_state=opt_state, skipped=scalar)
  specs = TrainState(step=PartitionSpec(), params=param_specs, opt_state=opt_specs,
                     skipped=PartitionSpec())
  return abstract, specs


def state_shardings(model, tx, mesh):
  """(abstract TrainState, its NamedShardings on `mesh`)."""
  abstract, specs = state_logical_specs(model, tx)
  return abstract, sharding.logical_to_sharding(specs, mesh)


def init_state(model, tx, mesh, seed: int) -> TrainState:
  """Initialises parameters and optimizer state directly in their shardings."""
  _, shardings = state_shardings(model, tx, mesh)

  def init(rng):
    params = nn.meta.unbox(model.init(rng, jnp.zeros((1, 1), jnp.int32))["params"])
    zero = jnp.zeros((), jnp.int32)
    return TrainState(step=zero, params=params, opt_state=tx.init(params), skipped=zero)

  with sharding.activate(mesh):
    return jax.jit(init, out_shardings=shardings)(jax.random.key(seed))
