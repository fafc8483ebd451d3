"""Device mesh and shardings: data parallel over every device of every process."""
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


def make_mesh() -> Mesh:
  # jax.sharding.Mesh (auto axes): jax.make_mesh defaults to explicit axes,
  # which linen's Dropout and friends do not support.
  return Mesh(np.asarray(jax.devices()), ('data',))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def data_sharded(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P('data'))


def check_batch_size(batch_size: int, name: str = 'batch_size') -> None:
  n = jax.device_count()
  if batch_size % n:
    raise ValueError(f'{name}={batch_size} must be divisible by the number of devices ({n})')


def put_batch(batch: dict, mesh: Mesh) -> dict:
  """Process-local numpy batch -> global arrays sharded along the batch axis."""
  sharding = data_sharded(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in batch.items()}


def put_replicated(tree, mesh: Mesh):
  return jax.device_put(tree, replicated(mesh))
