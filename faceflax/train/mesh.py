"""Device mesh and shardings: a 'data' axis over every process, an optional 'model' axis.

Batches are split along 'data' (replicated along 'model'); parameters are
replicated unless a stage gives their logical axes (flax
``nn.with_logical_partitioning`` names), which ``LOGICAL_RULES`` map onto mesh
axes: with ``config.mesh.model = m > 1`` the annotated kernels are split m ways.
"""
import flax.linen as nn
import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXES = ('data', 'model')
DEFAULT_SHAPE = {'data': -1, 'model': 1}  # -1: every device the other axes leave
# Logical parameter axis -> mesh axis (None: replicated). MLP hidden units are
# split over 'model' (Megatron-style column / row split of the two kernels).
LOGICAL_RULES = (('mlp', 'model'), ('embed', None))


def make_mesh(shape=None) -> Mesh:
  """A ('data', 'model') mesh of all devices; ``shape`` is ``config.mesh`` (e.g. {'model': 2}).

  Devices are laid out in ``jax.devices()`` order (process by process), so the
  'model' axis stays inside one process and each process feeds whole rows of
  the 'data' axis with its own share of the batch.
  """
  shape = dict(DEFAULT_SHAPE, **dict(shape or {}))
  unknown = sorted(set(shape) - set(AXES))
  if unknown:
    raise ValueError(f'config.mesh: unknown axes {unknown}; known: {list(AXES)}')
  n, local = jax.device_count(), jax.local_device_count()
  model = int(shape['model'])
  data = int(shape['data']) if int(shape['data']) != -1 else n // max(model, 1)
  if model < 1 or data * model != n:
    raise ValueError(f'config.mesh data={shape["data"]} x model={model} does not cover the '
                     f'{n} devices')
  if local % model:
    raise ValueError(f'config.mesh.model={model} must divide the {local} devices of one '
                     'process (a model-parallel group cannot span processes here)')
  # jax.sharding.Mesh (auto axes): jax.make_mesh defaults to explicit axes,
  # which linen's Dropout and friends do not support.
  return Mesh(np.asarray(jax.devices()).reshape(data, model), AXES)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def data_sharded(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P('data'))


def data_size(mesh: Mesh | None = None) -> int:
  """Devices along the batch axis (all devices without a mesh)."""
  return jax.device_count() if mesh is None else mesh.shape['data']


def check_batch_size(batch_size: int, name: str = 'batch_size', mesh: Mesh | None = None) -> None:
  n = data_size(mesh)
  if batch_size % n:
    raise ValueError(f'{name}={batch_size} must be divisible by the number of data-parallel '
                     f'devices ({n})')


def state_shardings(abstract_state, mesh: Mesh, param_axes=None, tx=None,
                    rules=LOGICAL_RULES):
  """Shardings of a train state: replicated, except annotated parameters and their moments.

  ``param_axes``: the params' logical PartitionSpecs (``nn.get_partition_spec``
  of the boxed params); ``tx`` locates the parameter-shaped leaves of the
  optimizer state (Adam's moments), which follow their parameter.
  """
  repl = replicated(mesh)
  out = jax.tree.map(lambda _: repl, abstract_state)
  if param_axes is None:
    return out
  params = nn.logical_to_mesh_sharding(param_axes, mesh, rules)
  masked = lambda x: isinstance(x, optax.MaskedNode)  # multi_transform's unused slots
  out['params'] = params
  if 'ema_params' in out:
    out['ema_params'] = params
  out['opt_state'] = optax.tree_utils.tree_map_params(
      tx, lambda v, s: v if masked(v) else s, abstract_state['opt_state'], params,
      transform_non_params=lambda _: repl, is_leaf=masked)
  return out


def unsplit_axes(params) -> dict:
  """Logical axes that split none of ``params`` (small heads beside an annotated model)."""
  return jax.tree.map(lambda _: P(), params)


def put_batch(batch: dict, mesh: Mesh) -> dict:
  """Process-local numpy batch -> global arrays sharded along the batch axis."""
  sharding = data_sharded(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in batch.items()}


def put_replicated(tree, mesh: Mesh):
  return jax.device_put(tree, replicated(mesh))
