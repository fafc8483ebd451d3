"""Reader for FER2013 as released for the ICML 2013 challenge (Kaggle): one `fer2013.csv`.

Columns: `emotion` (0..6, EMOTIONS), `pixels` (48*48 space-separated grey levels, row by
row) and `Usage` (Training / PublicTest / PrivateTest). faceflax calls the usages
train / val / test, as in the development copy ../shared/data/fer2013 (val = PublicTest).
A malformed row raises DataError naming the file, line and column; nothing is skipped.
"""

import csv
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np

from faceflax.data.errors import DataError
from faceflax.data.folder import csv_rows, open_text

EMOTIONS = ('angry', 'disgust', 'fear', 'happy', 'sad', 'surprise', 'neutral')
SIZE = 48
SPLITS = {'train': 'Training', 'val': 'PublicTest', 'test': 'PrivateTest'}
_COLUMNS = ('emotion', 'pixels', 'usage')
_USAGES = {usage: split for split, usage in SPLITS.items()}


class Row(NamedTuple):
  line: int  # 1-based line of the csv file, as in an editor.
  split: str
  emotion: int
  image: np.ndarray  # (48, 48, 1) uint8


def _pixels(text, where):
  fields = text.split()
  if len(fields) != SIZE * SIZE:
    raise DataError(f'{where}: column pixels: expected {SIZE * SIZE} values, got {len(fields)}')
  try:
    values = np.asarray(fields).astype(np.int64)  # Much faster than int() per value.
  except ValueError:
    values = None
  if values is None or values.min() < 0 or values.max() > 255:
    i = next(i for i, v in enumerate(fields) if not v.isdigit() or int(v) > 255)
    raise DataError(f'{where}: column pixels: value {i + 1} is {fields[i]!r}, '
                    'not an integer in 0..255')
  return values.astype(np.uint8).reshape(SIZE, SIZE, 1)


def _parse_row(row, index, where):
  emotion, usage = row[index['emotion']].strip(), row[index['usage']].strip()
  if not emotion.isdigit() or int(emotion) >= len(EMOTIONS):
    raise DataError(f'{where}: column emotion: {emotion!r} is not one of 0..{len(EMOTIONS) - 1}')
  split = _USAGES.get(usage)
  if split is None:
    raise DataError(f'{where}: column Usage: {usage!r} is not one of {list(SPLITS.values())}')
  return split, int(emotion)


def read_fer2013(csv_path, split=None) -> Iterator[Row]:
  """Yields the rows of `split` ('train', 'val', 'test'; None = all) in file order."""
  path = Path(csv_path).expanduser().absolute()
  if split is not None and split not in SPLITS:
    raise DataError(f'unknown FER2013 split {split!r}; valid: {tuple(SPLITS)} or None (all)')
  if not path.is_file():
    raise DataError(f'no such file: {path}')
  with open_text(path) as f:
    reader = csv.reader(f)
    header = [h.strip().lower() for h in next(reader, [])]
    missing = [c for c in _COLUMNS if c not in header]
    if missing:
      raise DataError(f'{path}: line 1: no column(s) {missing} (columns: {header})')
    index = {c: header.index(c) for c in _COLUMNS}
    num_rows = 0
    for where, row in csv_rows(reader, path, len(header)):
      num_rows += 1
      row_split, emotion = _parse_row(row, index, where)
      if split is None or split == row_split:
        yield Row(reader.line_num, row_split, emotion, _pixels(row[index['pixels']], where))
  if not num_rows:
    raise DataError(f'{path}: no rows')
