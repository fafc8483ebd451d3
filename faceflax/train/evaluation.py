"""Evaluation helpers shared by the tasks."""
import jax
import numpy as np
from jax.experimental import multihost_utils

from faceflax.data import pipeline
from faceflax.train import mesh as mesh_lib


def predict_all(forward, params, paths, mesh, *, batch_size: int, pp: str, cache_pp: str,
                image_key: str = 'image', validate: bool = True, progress: str = 'evaluate'):
  """``forward(params, images)`` (a pytree of [B, ...] arrays) for every path once, in order.

  ``forward`` is jitted with replicated outputs; it sees ``batch[image_key]`` (after ``pp``:
  'image_lq' is a degraded view). The padded final batch is dropped by its mask, so no
  example is lost or counted twice whatever the batch size and process count.
  """
  mesh_lib.check_batch_size(batch_size, 'eval_batch_size')
  ds = pipeline.make_eval_dataset(paths, {}, batch_size=batch_size, pp=pp, cache_pp=cache_pp,
                                  process_index=jax.process_index(),
                                  process_count=jax.process_count(), validate=validate,
                                  progress=progress)
  chunks = []
  for batch in ds:
    batch = mesh_lib.put_batch({'image': batch[image_key], 'mask': batch['mask']}, mesh)
    out = jax.device_get(forward(params, batch['image']))
    mask = np.asarray(multihost_utils.process_allgather(batch['mask'], tiled=True))
    chunks.append(jax.tree.map(lambda v, m=mask: np.asarray(v)[m], out))
  return jax.tree.map(lambda *c: np.concatenate(c), *chunks)


def predict_images(forward, params, images, config, mesh):
  """``predict_all`` at a config's evaluation settings: ``eval_batch_size``, ``data.eval_pp``
  and the decode cache of ``data.image_size``."""
  return predict_all(forward, params, images, mesh, batch_size=config.eval_batch_size,
                     pp=config.data.eval_pp, cache_pp=pipeline.cache_pp(config))
