"""Entry points that find the right reader for a data directory."""

import os
from pathlib import Path

from absl import logging
import numpy as np

from faceflax.data import images, pipeline, records, scut_fbp5500
from faceflax.data.errors import DataError
from faceflax.data.folder import Examples, drop_bad_rows, in_split, read_folder

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp')
SCORE_RANGE = (1.0, 5.0)  # Beauty scores (SCUT-FBP5500's raters), the models' score_range.


def _existing_dir(data_dir):
  path = Path(data_dir).expanduser().absolute()
  if not path.is_dir():
    raise DataError(f'no such directory: {path}')
  return path


def load_examples(data_dir, split, *, label_columns=(), protocol='60_40') -> Examples:
  """Reads `split` of an official SCUT-FBP5500 download or a folder-format dataset.

  A 'score' outside SCORE_RANGE is a bad example: the score head's bins span
  only that range, so such a label cannot be learnt.
  """
  root = _existing_dir(data_dir)
  if scut_fbp5500.is_official_layout(root):
    unknown = set(label_columns) - {'score'}
    if unknown:
      raise DataError(f'{root}: the official SCUT-FBP5500 lists only have "score", '
                      f'not {sorted(unknown)}')
    examples = scut_fbp5500.read_official(root, split, protocol)
  else:
    if protocol != '60_40':
      logging.warning('protocol=%r ignored: %s is in folder format.', protocol, root)
    examples = read_folder(root, split, label_columns=label_columns)
  if 'score' not in label_columns:
    return examples
  lo, hi = SCORE_RANGE
  score = examples.labels['score']
  return drop_bad_rows(examples, [None if lo <= v <= hi else f'score {v:g}' for v in score],
                       root, f'score(s) outside {lo:g}..{hi:g}')


def select_fold(examples: Examples, column: str, fold: int, train: bool, where) -> Examples:
  """Cross-validation inside a dataset: the rows whose ``column`` is ``fold`` (the fold's
  held-out rows) or, with ``train``, all the others."""
  if column not in examples.labels:
    raise DataError(f'{where}: no column {column!r} to take cross-validation fold {fold} from '
                    f'(columns: {sorted(examples.labels)})')
  values = np.asarray(examples.labels[column], np.float64)
  folds = sorted({int(v) for v in values if np.isfinite(v)})
  if fold not in folds:
    raise DataError(f'{where}: column {column!r} has no fold {fold} (folds: {folds})')
  held_out = values == fold
  return examples.select(~held_out if train else held_out)


def _is_folder_format(root):
  return (root / 'images').is_dir() and (root / 'labels.csv').is_file()


def _images_under(root):
  found = []
  for folder, _, files in os.walk(root, followlinks=True):
    found += [os.path.join(folder, f) for f in files
              if f.lower().endswith(IMAGE_EXTENSIONS)]
  return sorted(found)


def list_unlabeled_images(dirs, tfds_data_dir=''):
  """Images for unlabeled pretraining, in the order of ``dirs``.

  A folder-format dataset, a record store or a TFDS build ('tfds:NAME[/CONFIG]', from
  ``tfds_data_dir``) contributes its train rows only (all rows if it has no split
  column), so val/test faces never leak into pretraining. Any other directory
  contributes every image file below it, sorted. Paths when every entry is a folder
  (duplicates dropped), else a ``pipeline.ConcatImages`` of the stores' records and the
  folders' paths.
  """
  if isinstance(dirs, (str, os.PathLike)):
    dirs = [dirs]
  parts = []
  for data_dir in dirs:
    if str(data_dir).startswith(records.TFDS_PREFIX):
      data_dir = records.dataset_path(str(data_dir), tfds_data_dir=tfds_data_dir)
    root = _existing_dir(data_dir)
    if _is_folder_format(root) or records.is_store(root) or records.is_insightface_pack(root):
      examples = read_folder(root)
      examples = examples.select(in_split(examples, 'train'))
      found = examples.images
    else:
      found = _images_under(root)
      found = [p for p, ok in zip(found, images.screen(found, str(root))) if ok]
    if not len(found):
      raise DataError(f'{root}: no images found')
    parts.append(found)
  return pipeline.join_images(parts, drop_repeats=True)
