"""Evaluation helpers shared by the tasks."""
import jax
import numpy as np
from jax.experimental import multihost_utils

from faceflax.data import pipeline
from faceflax.train import mesh as mesh_lib


def predict_all(forward, params, paths, mesh, *, batch_size: int, pp: str, cache_pp: str):
  """``forward(params, images)`` (a pytree of [B, ...] arrays) for every path once, in order.

  ``forward`` is jitted with replicated outputs. The padded final batch is
  dropped by its mask, so no example is lost or counted twice whatever the
  batch size and process count.
  """
  mesh_lib.check_batch_size(batch_size, 'eval_batch_size')
  ds = pipeline.make_eval_dataset(paths, {}, batch_size=batch_size, pp=pp, cache_pp=cache_pp,
                                  process_index=jax.process_index(),
                                  process_count=jax.process_count(), progress='evaluate')
  chunks = []
  for batch in ds:
    batch = mesh_lib.put_batch(batch, mesh)
    out = jax.device_get(forward(params, batch['image']))
    mask = np.asarray(multihost_utils.process_allgather(batch['mask'], tiled=True))
    chunks.append(jax.tree.map(lambda v, m=mask: np.asarray(v)[m], out))
  return jax.tree.map(lambda *c: np.concatenate(c), *chunks)
