"""Face-identity training sets of a folder-format dataset: contiguous class indices of an
identity column (ArcFace's classes), and per-row arrays beside it such as an external
teacher's precomputed embeddings."""
import dataclasses
import os

import numpy as np
from absl import logging

from faceflax.data.errors import DataError
from faceflax.data.folder import Examples, in_split, load_array, read_folder


@dataclasses.dataclass(frozen=True)
class TrainSet:
  examples: Examples
  labels: np.ndarray         # contiguous class index per example
  num_classes: int
  rows: np.ndarray           # labels.csv row of each example (for per-row arrays)


def read_train_set(data_dir: str, identity_column: str, split: str,
                   drop_noisy: bool) -> TrainSet:
  """The rows of ``split`` (every row without a split column), less those marked
  ``id_noisy=1`` when ``drop_noisy``, with their identities as classes 0..n-1."""
  everything = read_folder(data_dir, label_columns=(identity_column,))
  keep = np.ones(len(everything), bool)
  if 'split' in everything.labels:
    keep &= in_split(everything, split)
  else:
    logging.warning('%s has no split column: training on every row', data_dir)
  if drop_noisy and 'id_noisy' in everything.labels:
    noisy = keep & (everything.labels['id_noisy'] == 1)
    logging.info('not training on %d rows marked id_noisy=1', int(noisy.sum()))
    keep &= ~noisy
  if not keep.any():
    raise DataError(f'{data_dir}: no training rows (split {split!r})')
  examples = everything.select(keep)
  rows = examples.rows  # labels.csv rows, even when bad rows were skipped
  classes, labels = np.unique(examples.labels[identity_column], return_inverse=True)
  logging.info('training identities: %d, images: %d', len(classes), len(examples))
  return TrainSet(examples, labels.astype(np.int32), len(classes), rows)


def _check_exists(path: str) -> None:
  if not os.path.isfile(path):
    raise DataError(f'student_external needs the teacher embeddings {path}: no such file')


def row_embeddings(path: str, data_dir: str, rows) -> np.ndarray:
  """Rows ``rows`` of the [labels.csv rows, dim] array ``path`` (an external teacher's
  embedding of every image of ``data_dir``), checked to have one finite row per csv row."""
  _check_exists(path)
  emb = load_array(path)
  num_rows = len(read_folder(data_dir, check_files=False))
  if emb.ndim != 2 or emb.shape[0] != num_rows:
    raise DataError(f'{path}: shape {emb.shape}, expected ({num_rows}, dim): one row per '
                    'labels.csv row')
  if not np.all(np.isfinite(emb)):
    raise DataError(f'{path}: non-finite values in rows '
                    f'{np.flatnonzero(~np.isfinite(emb).all(1))[:5]}')
  return emb[rows].astype(np.float32)


def embedding_width(path: str) -> int:
  """The width of the embeddings in ``path`` (read from its header)."""
  _check_exists(path)
  return int(load_array(path, mmap_mode='r').shape[1])
