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

BATCH_AXES = ("batch", "length")


def is_primary() -> bool:
  """Whether this process writes logs, metrics and files that exist once per run."""
  return jax.process_index() == 0


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


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding of a [batch, length] input array."""
  return NamedSharding(mesh, nn.logical_to_mesh_axes(BATCH_AXES, LOGICAL_RULES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles each host's rows of the batch into global arrays sharded over the mesh."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}
