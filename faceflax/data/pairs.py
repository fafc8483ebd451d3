"""Face-verification pair lists: a pairs CSV over an image folder, or insightface `.bin` files."""

import csv
import dataclasses
import os
from pathlib import Path
import pickle

import numpy as np

from faceflax.data.errors import DataError
from faceflax.data.folder import check_relative, open_text

_MAX_LISTED = 5  # How many offending names an error message lists.
_COLUMNS = (('file_a', 'filename_a'), ('file_b', 'filename_b'), ('same',))
_SAME_VALUES = {'0': False, '1': True, 'false': False, 'true': True}
# What tf.io.decode_image reads: JPEG, PNG, BMP, GIF, WEBP.
_IMAGE_MAGIC = (b'\xff\xd8\xff', b'\x89PNG\r\n\x1a\n', b'BM', b'GIF8', b'RIFF')


@dataclasses.dataclass(frozen=True)
class Pairs:
  """Image paths of the two sides of each pair, and whether they show one person."""
  paths_a: np.ndarray
  paths_b: np.ndarray
  same: np.ndarray

  def __len__(self):
    return len(self.same)


@dataclasses.dataclass(frozen=True)
class BinPairs:
  """Encoded image bytes (object arrays) of the two sides of each pair, and `same`."""
  images_a: np.ndarray
  images_b: np.ndarray
  same: np.ndarray

  def __len__(self):
    return len(self.same)


def read_pairs_csv(path, images_root, *, check_files=True) -> Pairs:
  """Reads `file_a,file_b,same` rows (or `filename_a,filename_b,same`) naming images in `images_root`."""
  path = Path(path).expanduser().absolute()
  images_root = Path(images_root).expanduser().absolute()
  if not path.is_file():
    raise DataError(f'no such file: {path}')
  if check_files and not images_root.is_dir():
    raise DataError(f'no such directory: {images_root}')
  with open_text(path) as f:
    reader = csv.DictReader(f)
    header = reader.fieldnames
    if not header:
      raise DataError(f'{path}: empty file, expected a header '
                      f'{",".join(names[0] for names in _COLUMNS)}')
    columns = []
    for names in _COLUMNS:
      found = [name for name in names if name in header]
      if not found:
        wanted = ' or '.join(repr(name) for name in names)
        raise DataError(f'{path}: line 1: no column {wanted} (columns: {header})')
      columns.append(found[0])
    col_a, col_b, col_same = columns
    paths_a, paths_b, same, lines = [], [], [], []
    for row in reader:
      line = reader.line_num
      if None in row or None in row.values():
        raise DataError(f'{path}: line {line}: expected {len(header)} fields')
      value = row[col_same].strip().lower()
      if value not in _SAME_VALUES:
        raise DataError(f'{path}: line {line}: column {col_same!r} must be 0, 1, true or '
                        f'false, got {row[col_same]!r}')
      for column, paths in ((col_a, paths_a), (col_b, paths_b)):
        check_relative(row[column], f'{path}: line {line}: column {column!r}')
        paths.append(str(images_root / row[column]))
      same.append(_SAME_VALUES[value])
      lines.append(line)
  if not same:
    raise DataError(f'{path}: no pairs after the header')
  if check_files:
    missing = [f'line {line} column {column!r}: {p}'
               for line, a, b in zip(lines, paths_a, paths_b)
               for column, p in ((col_a, a), (col_b, b)) if not os.path.isfile(p)]
    if missing:
      raise DataError(f'{path}: {len(missing)} image file(s) missing, e.g. '
                      + '; '.join(missing[:_MAX_LISTED]))
  return Pairs(np.asarray(paths_a), np.asarray(paths_b), np.asarray(same, bool))


def _numpy_globals():
  """The numpy callables a pickled bool or uint8 array or scalar needs, by pickled name."""
  try:
    from numpy._core import multiarray  # pylint: disable=g-import-not-at-top  # numpy >= 2.
  except ImportError:
    from numpy.core import multiarray  # pylint: disable=g-import-not-at-top
  allowed = {('numpy', 'ndarray'): np.ndarray, ('numpy', 'dtype'): np.dtype}
  # numpy 1 pickles name numpy.core, numpy 2 numpy._core: accept both, import neither.
  for module in ('numpy.core.multiarray', 'numpy._core.multiarray'):
    allowed[module, '_reconstruct'] = multiarray._reconstruct  # pylint: disable=protected-access
    allowed[module, 'scalar'] = multiarray.scalar
  return allowed


class _RestrictedUnpickler(pickle.Unpickler):
  """Unpickler that resolves only numpy array/scalar globals, so loading runs no other code."""

  def __init__(self, file, where):
    super().__init__(file, encoding='bytes')
    self.where = where
    self.allowed = _numpy_globals()

  def find_class(self, module, name):
    if (module, name) not in self.allowed:
      raise DataError(f'{self.where}: refusing to load global {module}.{name}: a '
                      'verification .bin holds only image bytes and booleans')
    return self.allowed[module, name]


def _image_bytes(item):
  """Encoded bytes of one image, from bytes or a uint8 array (as some .bin files hold)."""
  if isinstance(item, np.ndarray) and item.dtype == np.uint8 and item.ndim == 1:
    return item.tobytes()
  if isinstance(item, (bytes, bytearray)):
    return bytes(item)
  return None


def read_bin(path) -> BinPairs:
  """Reads an insightface verification file (lfw.bin, agedb_30.bin, ...) without running code.

  The file is a pickle of (encoded images, is-same flags) holding images
  a0, b0, a1, b1, ... for pairs 0, 1, ...
  """
  path = Path(path).expanduser().absolute()
  if not path.is_file():
    raise DataError(f'no such file: {path}')
  with open(path, 'rb') as f:
    try:
      loaded = _RestrictedUnpickler(f, str(path)).load()
    except DataError:
      raise
    except Exception as e:  # pylint: disable=broad-except  # Corrupt pickles raise many types.
      raise DataError(f'{path}: not a readable pickle ({type(e).__name__}: {e})') from e
  if not (isinstance(loaded, (tuple, list)) and len(loaded) == 2
          and all(isinstance(x, (tuple, list, np.ndarray)) for x in loaded)):
    raise DataError(f'{path}: expected a pickled (images, issame) pair of lists, got '
                    f'{type(loaded).__name__}')
  bins, issame = loaded
  if len(bins) % 2:
    raise DataError(f'{path}: odd number of images ({len(bins)}); expected 2 per pair')
  if len(bins) != 2 * len(issame):
    raise DataError(f'{path}: {len(bins)} images for {len(issame)} pairs; expected '
                    f'{2 * len(issame)}')
  if not len(issame):
    raise DataError(f'{path}: no pairs')
  images = []
  for i, item in enumerate(bins):
    data = _image_bytes(item)
    if data is None or not data.startswith(_IMAGE_MAGIC):
      what = type(item).__name__ if data is None else f'{data[:8]!r}...'
      raise DataError(f'{path}: image {i} (pair {i // 2}) is not an encoded image: {what}')
    images.append(data)
  same = np.asarray(issame)
  if same.ndim != 1 or not (same.dtype == bool or np.isin(same, (0, 1)).all()):
    raise DataError(f'{path}: issame flags must be booleans or 0/1')
  images = np.asarray(images, dtype=object)  # Object keeps trailing NUL bytes, 'S' drops them.
  return BinPairs(images[0::2], images[1::2], same.astype(bool))


def write_bin(path, images_a, images_b, same):
  """Writes encoded image bytes and is-same flags in the format `read_bin` reads."""
  if not len(images_a) == len(images_b) == len(same):
    raise ValueError(f'{len(images_a)} images a, {len(images_b)} images b and '
                     f'{len(same)} flags: need one of each per pair')
  bins = []
  for a, b in zip(images_a, images_b):
    bins += [bytes(a), bytes(b)]
  with open(path, 'wb') as f:
    pickle.dump((bins, [bool(s) for s in same]), f, protocol=pickle.HIGHEST_PROTOCOL)
