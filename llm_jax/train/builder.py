"""The one builder: model, optimizer and schedule, and the compiled steps of a resolved config.

Training, planning, benchmarks and tests all build through `build`, so what they compile is
what `llm-jax train` runs.
"""

import dataclasses
import functools

import jax
import optax
from jax.sharding import Mesh

from llm_jax import objectives
from llm_jax.parallel import sharding
from llm_jax.model.transformer import ModelConfig, Transformer
from llm_jax.objectives.next_token import NEXT_TOKEN
from llm_jax.train import optimizer, state as state_lib, step as step_lib


@dataclasses.dataclass(frozen=True)
class Built:
  """Everything a run computes with, for one config, objective and mesh.

  `train_step(state, batch, reference)` is jitted with the state's, the batch's and (for an
  objective with a reference) the parameters' shardings, and donates the state;
  `eval_step(params, batch)` returns (loss sum, weight, metric sums).
  """
  config: object  # the resolved config
  mesh: Mesh
  objective: objectives.Objective
  model: Transformer
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  train_step: object
  batch_shardings: dict

  def eval_step(self, params, batch):
    return objectives.evaluate_batch(params, batch, objective=self.objective, model=self.model)

  def init_state(self) -> state_lib.TrainState:
    """A fresh train state (seed `train.seed`), created in its shardings."""
    return state_lib.init_state(self.model, self.tx, self.mesh, self.config.train.seed)

  def abstract_state(self):
    """The train state as ShapeDtypeStructs with their shardings: nothing is allocated."""
    return sharding.with_shardings(*state_lib.state_shardings(self.model, self.tx, self.mesh))

  def abstract_batch(self):
    """A global training batch as ShapeDtypeStructs with their shardings."""
    sizes = {"batch": self.config.train.batch_size,
             "length": self.config.model.context_length}
    abstract = self.objective.abstract_batch(sizes)
    return sharding.with_shardings(abstract, {k: self.batch_shardings[k] for k in abstract})

  def global_batch(self, local_batch):
    """This process's rows of a batch as global arrays sharded over the mesh."""
    return sharding.global_batch(local_batch, self.mesh, self.batch_shardings)


def build(config, mesh: Mesh, objective: objectives.Objective = NEXT_TOKEN) -> Built:
  """Builds from a resolved config (`llm_jax.config.resolve`)."""
  t = config.train
  model = Transformer(ModelConfig.from_config(config.model))
  tx = optimizer.make_optimizer(t, objective.passes)
  schedule = optimizer.learning_rate_schedule(t, objective.passes)
  _, state_shardings = state_lib.state_shardings(model, tx, mesh)
  batch_shardings = sharding.batch_shardings(objective, mesh)
  train_step = jax.jit(
      functools.partial(step_lib.train_step, objective=objective, model=model, tx=tx,
                        schedule=schedule, grad_accum_steps=t.grad_accum_steps),
      in_shardings=(state_shardings, batch_shardings,
                    state_shardings.params if objective.reference else None),
      out_shardings=(state_shardings, sharding.replicated(mesh)), donate_argnums=0)
  return Built(config, mesh, objective, model, tx, schedule, train_step, batch_shardings)
