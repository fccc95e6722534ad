"""The device mesh, the one logical-to-mesh rules table, and shardings derived from it.

Parallelism is a config change: `mesh.data`, `mesh.fsdp` and `mesh.tensor` shape the mesh,
and `LOGICAL_RULES` says which mesh axes each logical axis name is split over. Flax resolves
a name to the first of its rules whose mesh axes are not already used in the same array, so
activations keep `embed` whole while the batch is split over `fsdp`, and parameters split
`embed` over `fsdp` (ZeRO-3 style) and heads / MLP / vocabulary over `tensor`.
"""

import contextlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from llm_jax.config import MESH_AXES, resolve_mesh_shape

LOGICAL_RULES = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("layers", None),
)

TOKEN_AXES = ("batch", "length")


def make_mesh(mesh_config, devices=None) -> Mesh:
  devices = devices if devices is not None else jax.devices()
  shape = resolve_mesh_shape(mesh_config, len(devices))
  dims = tuple(shape[axis] for axis in MESH_AXES)
  try:
    grid = mesh_utils.create_device_mesh(dims, devices=devices)
  except (ValueError, NotImplementedError, AssertionError):
    # Topology-aware placement is for physical TPU/GPU slices; fall back to device order.
    grid = np.asarray(devices).reshape(dims)
  return Mesh(grid, MESH_AXES)


@contextlib.contextmanager
def activate(mesh: Mesh):
  """Makes `mesh` and `LOGICAL_RULES` current, so logical constraints in the model resolve."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
    yield


def logical_to_sharding(logical_specs, mesh: Mesh):
  """Maps a pytree of logical PartitionSpecs to NamedShardings on `mesh`."""
  return nn.logical_to_mesh_sharding(logical_specs, mesh, LOGICAL_RULES)


def batch_sharding(mesh: Mesh, axes=TOKEN_AXES) -> NamedSharding:
  """Sharding of an input array with logical `axes` (default: a [batch, length] array)."""
  return NamedSharding(mesh, nn.logical_to_mesh_axes(axes, LOGICAL_RULES))


def batch_shardings(objective, mesh: Mesh) -> dict[str, NamedSharding]:
  """Sharding of each array of a batch of `objective` (`llm_jax.objectives.Objective`)."""
  return {name: batch_sharding(mesh, axes) for name, (_, axes) in objective.batch.items()}


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh, shardings=None
                 ) -> dict[str, jax.Array]:
  """Assembles each host's rows of the batch into global arrays sharded over the mesh.

  `shardings` maps each array to its sharding (`batch_shardings`), and arrays it does not name
  (a batch source's bookkeeping, such as pair indices) are left out; by default every array is
  a [batch, length] one.
  """
  return {k: jax.make_array_from_process_local_data(
      shardings[k] if shardings else batch_sharding(mesh), v) for k, v in local_batch.items()
      if shardings is None or k in shardings}


def to_host(x) -> np.ndarray:
  """The whole value of a global array on every process (gathered when other processes hold
  parts of it)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # only multi-process runs need it
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def logical_params(model):
  """(abstract parameters, their logical PartitionSpecs) of a model; nothing is allocated."""
  def init(rng):
    return model.init(rng, jnp.zeros((1, 1), jnp.int32))["params"]
  boxed = jax.eval_shape(init, jax.random.key(0))
  # Not nn.meta.unbox: under an active mesh it would apply sharding constraints to shapes.
  params = jax.tree.map(lambda x: x.value, boxed,
                        is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))
  return params, nn.get_partition_spec(boxed)


def with_shardings(abstract, shardings):
  """ShapeDtypeStructs of `abstract` carrying `shardings`: targets to restore or compile for."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings)


def abstract_params(model, mesh: Mesh):
  """The parameters of `model` as ShapeDtypeStructs with their shardings on `mesh`."""
  params, specs = logical_params(model)
  return with_shardings(params, logical_to_sharding(specs, mesh))
