"""An external teacher (``faceflax.teachers``) run on a task's own views of its images.

Each image goes through the task's preprocessing, is resized to the teacher's input and
embedded once; the embeddings are cached beside the workdir (shared by the runs of a
sweep, ``<dir>/seed0``, ``<dir>/seed1``, ...). In a multi-host job process 0 fills the
cache and the others then read it. Used by ``lqfr_kd`` (identity KD) and ``fbp_kd`` (a
second teacher of the beauty student).
"""
import functools
import os

import jax
import numpy as np
from jax.experimental import multihost_utils

from faceflax import teachers
from faceflax.data import pipeline


def centred(embeddings: np.ndarray) -> np.ndarray:
  """Unit embeddings less their mean, renormalised. A face embedding such as dlib's has a
  large component common to all faces (different people's faces: cosine 0.84 on average on
  celeba_id): the cosine to the raw vectors is then nearly met by that common direction
  alone, and a student distilled on it learns little of what tells faces apart."""
  e = embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)
  e = e - e.mean(0)
  return (e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def cache_dir(configured: str, workdir: str) -> str:
  """``configured``, by default ``teacher_cache`` beside the workdir."""
  return configured or os.path.join(os.path.dirname(os.path.abspath(workdir)), 'teacher_cache')


def pipeline_views(images, *, pp: str, cache_pp: str, image_key: str = 'image',
                   batch_size: int = 128):
  """positions -> uint8 batches of ``images[positions]`` after ``cache_pp`` and ``pp``."""
  def views(positions):
    subset = (images.take(positions) if hasattr(images, 'take')
              else [images[int(i)] for i in positions])
    for batch in pipeline.make_eval_dataset(subset, {}, batch_size=batch_size, pp=pp,
                                            cache_pp=cache_pp, validate=False, mode='stream'):
      yield np.clip(np.round(batch[image_key][batch['mask']]), 0, 255).astype(np.uint8)
  return views


def embeddings(name: str, images, workdir: str, *, cache: str = '', mirror_average: bool = True,
               workers: int = 0, batch_size: int = 128, view_pp: str = '', cache_pp: str = '',
               image_key: str = 'image', teacher=None) -> np.ndarray:
  """[N, dim] embeddings by teacher ``name`` of ``images`` as seen after ``cache_pp`` and
  ``view_pp`` (default: the decoded face), resized to its input size; cached in
  ``cache_dir(cache, workdir)``. ``workers``: processes computing them (0: one per CPU)."""
  teacher = teacher or teachers.TEACHERS[name]()
  cache_pp = cache_pp or 'decode'
  view_pp = f'{view_pp}|resize({teacher.input_size})'
  views = pipeline_views(images, pp=view_pp, cache_pp=cache_pp, image_key=image_key,
                         batch_size=batch_size)
  compute = functools.partial(
      teachers.embeddings, teacher, images, views, f'{cache_pp}|{view_pp}|{image_key}',
      cache_dir(cache, workdir), mirror_average=mirror_average,
      workers=workers or os.cpu_count() or 1)
  if jax.process_count() == 1:
    return compute()
  emb = compute() if jax.process_index() == 0 else None
  multihost_utils.sync_global_devices('external teacher embeddings')
  return compute() if emb is None else emb
