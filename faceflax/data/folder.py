"""Reader for the "folder format": `<root>/images/` + `<root>/labels.csv`."""

import csv
import dataclasses
import math
import os
from pathlib import Path, PurePath

from absl import logging
import numpy as np

from faceflax.data.errors import DataError

_MAX_LISTED = 5  # How many offending names an error message lists.


@dataclasses.dataclass(frozen=True)
class Examples:
  """Image paths plus per-row labels of one dataset split."""
  name: str
  paths: tuple[str, ...]
  labels: dict[str, np.ndarray]

  def __post_init__(self):
    for key, values in self.labels.items():
      if len(values) != len(self.paths):
        raise DataError(f'{self.name}: label {key!r} has {len(values)} rows '
                        f'but there are {len(self.paths)} paths')

  def __len__(self):
    return len(self.paths)

  def select(self, idx) -> 'Examples':
    idx = np.asarray(idx)
    if idx.dtype == bool:
      idx = np.flatnonzero(idx)
    paths = tuple(self.paths[i] for i in idx.tolist())
    labels = {k: v[idx] for k, v in self.labels.items()}
    return Examples(self.name, paths, labels)


def check_relative(filename, where):
  """Rejects names that are empty, absolute or climb out of the image folder."""
  path = PurePath(filename)
  if not filename or path.is_absolute() or '..' in path.parts:
    raise DataError(f'{where}: filename {filename!r} must be a relative path '
                    'inside the image folder')


def check_files_exist(paths, where):
  missing = [p for p in paths if not os.path.isfile(p)]
  if missing:
    shown = ', '.join(missing[:_MAX_LISTED])
    raise DataError(f'{where}: {len(missing)} image file(s) missing, e.g. {shown}')


def _parse_float(text):
  try:
    return float(text)
  except ValueError:
    return None


def _column_array(values):
  """float32 if every non-empty value parses as a number (empty -> NaN), else str."""
  numbers = [math.nan if not v.strip() else _parse_float(v) for v in values]
  if values and all(x is not None for x in numbers):
    return np.asarray(numbers, np.float32)
  return np.asarray(values, dtype=object)


def _read_csv(csv_path):
  """Returns (columns, rows, line numbers); line numbers are 1-based, as in an editor."""
  with open(csv_path, newline='', encoding='utf-8-sig') as f:
    reader = csv.DictReader(f)
    columns = reader.fieldnames or []
    if 'filename' not in columns:
      raise DataError(f'{csv_path}: no "filename" column (columns: {columns})')
    rows, lines = [], []
    for row in reader:
      if None in row or None in row.values():
        raise DataError(f'{csv_path}: line {reader.line_num}: expected '
                        f'{len(columns)} fields')
      rows.append(row)
      lines.append(reader.line_num)
  if not rows:
    raise DataError(f'{csv_path}: no rows')
  return columns, rows, lines


def _check_label(csv_path, line, column, value):
  number = _parse_float(value)
  if number is None or not math.isfinite(number):
    raise DataError(f'{csv_path}: line {line}: column {column!r} needs a finite '
                    f'number, got {value!r}')


def read_folder(root, split=None, *, label_columns=(), check_files=True) -> Examples:
  """Reads a folder-format dataset, optionally restricted to one `split`."""
  root = Path(root).expanduser().absolute()
  images_dir, csv_path = root / 'images', root / 'labels.csv'
  for path in (root, images_dir):
    if not path.is_dir():
      raise DataError(f'no such directory: {path}')
  if not csv_path.is_file():
    raise DataError(f'no such file: {csv_path}')
  columns, rows, lines = _read_csv(csv_path)
  for column in label_columns:
    if column not in columns:
      raise DataError(f'{csv_path}: no column {column!r} (columns: {columns})')

  keep = range(len(rows))
  if split is not None:
    if 'split' not in columns:
      logging.warning('%s has no "split" column; using all %d rows for split %r.',
                      csv_path, len(rows), split)
    else:
      keep = [i for i, row in enumerate(rows) if row['split'] == split]
      if not keep:
        available = sorted({row['split'] for row in rows})
        raise DataError(f'{csv_path}: no rows with split {split!r}; '
                        f'available splits: {available}')

  for i in keep:
    check_relative(rows[i]['filename'], f'{csv_path}: line {lines[i]}')
    for column in label_columns:
      _check_label(csv_path, lines[i], column, rows[i][column])

  # Types are inferred on all rows so a column has the same dtype in every split.
  labels = {c: _column_array([row[c] for row in rows])[list(keep)]
            for c in columns if c != 'filename'}
  paths = tuple(str(images_dir / rows[i]['filename']) for i in keep)
  if check_files:
    check_files_exist(paths, str(csv_path))
  return Examples(root.name, paths, labels)
