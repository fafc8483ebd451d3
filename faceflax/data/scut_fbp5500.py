"""Reader for the official SCUT-FBP5500_v2 distribution, as downloaded from its authors.

Layout (the root folder itself may have any name):
  Images/*.jpg
  train_test_files/split_of_60%training and 40%testing/{train,test}.txt
  train_test_files/5_folders_cross_validations_files/cross_validation_{k}/{train,test}_{k}.txt
Each list line is "<filename> <mean score>".
"""

import math
from pathlib import Path

import numpy as np

from faceflax.data.errors import DataError
from faceflax.data.folder import Examples, check_relative, read_text, screen_files

PROTOCOLS = ('60_40', 'cv1', 'cv2', 'cv3', 'cv4', 'cv5')
SPLITS = ('train', 'test')
_LISTS_DIR = 'train_test_files'
_SPLIT_60_40_DIR = 'split_of_60%training and 40%testing'
_CV_DIR = '5_folders_cross_validations_files'


def _images_dir(root):
  for name in ('Images', 'images'):
    if (root / name).is_dir():
      return root / name
  return None


def is_official_layout(root) -> bool:
  root = Path(root)
  return (root / _LISTS_DIR).is_dir() and _images_dir(root) is not None


def _find_dir(parent, name, pattern):
  """`parent/name`, else the single sub-folder matching `pattern` (renamed copies)."""
  if (parent / name).is_dir():
    return parent / name
  matches = sorted(p for p in parent.glob(pattern) if p.is_dir())
  if len(matches) != 1:
    found = sorted(p.name for p in parent.iterdir()) if parent.is_dir() else []
    raise DataError(f'expected folder {parent / name} (found: {found})')
  return matches[0]


def _list_file(root, split, protocol):
  lists = root / _LISTS_DIR
  if protocol == '60_40':
    return _find_dir(lists, _SPLIT_60_40_DIR, 'split_of_60*') / f'{split}.txt'
  k = protocol[2:]
  cv_dir = _find_dir(lists, _CV_DIR, '*cross_validation*')
  return _find_dir(cv_dir, f'cross_validation_{k}', f'*{k}') / f'{split}_{k}.txt'


def _parse_list(path):
  """Returns [(filename, score)], tolerating blank lines and CRLF endings."""
  if not path.is_file():
    raise DataError(f'no such file: {path}')
  entries = []
  for line_number, line in enumerate(read_text(path).splitlines(), 1):
    fields = line.split()
    if not fields:
      continue
    where = f'{path}: line {line_number}'
    if len(fields) != 2:
      raise DataError(f'{where}: expected "<filename> <score>", got {line!r}')
    filename, score = fields
    try:
      score = float(score)
    except ValueError:
      score = math.nan
    if not math.isfinite(score):
      raise DataError(f'{where}: score {fields[1]!r} is not a finite number')
    check_relative(filename, where)
    entries.append((filename, score))
  if not entries:
    raise DataError(f'{path}: no entries')
  return entries


def read_official(root, split='train', protocol='60_40') -> Examples:
  """Reads one split of an official protocol; labels: {'score'} (mean rating, 1..5)."""
  root = Path(root).expanduser().absolute()
  if protocol not in PROTOCOLS:
    raise DataError(f'unknown SCUT-FBP5500 protocol {protocol!r}; valid: {PROTOCOLS}')
  if split not in SPLITS:
    raise DataError(f'unknown SCUT-FBP5500 split {split!r}; valid: {SPLITS}')
  if not is_official_layout(root):
    raise DataError(f'{root} is not an official SCUT-FBP5500 folder '
                    f'(needs Images/ and {_LISTS_DIR}/)')
  list_path = _list_file(root, split, protocol)
  entries = _parse_list(list_path)
  images_dir = _images_dir(root)
  paths = tuple(str(images_dir / filename) for filename, _ in entries)
  scores = np.asarray([score for _, score in entries], np.float32)
  return screen_files(Examples('scut_fbp5500', paths, {'score': scores}), list_path)
