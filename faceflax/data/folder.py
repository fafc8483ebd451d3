"""Reader for the "folder format": `<root>/images/` + `<root>/labels.csv`.

Every problem raises DataError naming the file, line, column or value
(``read_folder``'s docstring lists them); bad examples can be skipped instead
through ``bad_data`` (``config.data.skip_bad``).
"""

import csv
import dataclasses
import io
import math
import os
from pathlib import Path, PurePath

from absl import logging
import numpy as np

from faceflax.data import bad_data, images, records
from faceflax.data.errors import DataError

_MAX_LISTED = bad_data.MAX_LISTED


@dataclasses.dataclass(frozen=True)
class Examples:
  """Image paths plus per-row labels of one dataset split.

  ``rows``: each example's row in the source list (0 = the first data row of
  labels.csv), so per-row arrays (``*.npy``) stay aligned after a split or after
  bad rows were skipped. With a record ``store`` (``records``), ``rows`` are record
  indices and ``paths`` the records' source names, read lazily from the store.
  """
  name: str
  paths: 'tuple[str, ...] | records.RecordNames'
  labels: dict[str, np.ndarray]
  rows: np.ndarray | None = dataclasses.field(default=None, compare=False)
  store: 'records.RecordStore | None' = dataclasses.field(default=None, compare=False)

  def __post_init__(self):
    for key, values in self.labels.items():
      if len(values) != len(self.paths):
        raise DataError(f'{self.name}: label {key!r} has {len(values)} rows '
                        f'but there are {len(self.paths)} paths')
    rows = np.arange(len(self.paths)) if self.rows is None else np.asarray(self.rows)
    if rows.shape != (len(self.paths),):
      raise DataError(f'{self.name}: {rows.shape} row numbers for {len(self.paths)} paths')
    object.__setattr__(self, 'rows', rows)

  def __len__(self):
    return len(self.paths)

  def select(self, idx) -> 'Examples':
    idx = np.asarray(idx)
    if idx.dtype == bool:
      idx = np.flatnonzero(idx)
    labels = {k: v[idx] for k, v in self.labels.items()}
    if self.store is not None:
      return Examples(self.name, records.RecordNames(self.store, self.rows[idx]), labels,
                      self.rows[idx], self.store)
    paths = tuple(self.paths[i] for i in idx.tolist())
    return Examples(self.name, paths, labels, self.rows[idx])

  @property
  def images(self):
    """What the input pipelines read: the image paths, or the store's records."""
    if self.store is not None:
      return records.RecordImages(self.store, self.rows)
    return self.paths


def read_text(path) -> str:
  """A UTF-8 text file (a BOM is dropped); bytes that are not UTF-8 are a DataError naming
  the line and byte they are on (a text stream would report its buffer's line instead)."""
  data = Path(path).read_bytes()
  try:
    return data.decode('utf-8-sig')
  except UnicodeDecodeError as e:
    line = data[:e.start].count(b'\n') + 1
    column = e.start - (data.rfind(b'\n', 0, e.start) + 1) + 1
    raise DataError(f'{path}: line {line}, byte {column} of the line: not UTF-8 text '
                    f'({data[e.start:e.end]!r}; save the file as UTF-8)') from None


def open_text(path) -> io.StringIO:
  """``read_text`` as a stream for ``csv`` (universal newlines kept for its quoting)."""
  return io.StringIO(read_text(path), newline='')


def check_relative(filename, where):
  """Rejects names that are empty, absolute or climb out of the image folder.

  Names come from data files, which are untrusted: a path they give must stay
  inside the dataset folder. Always an error, never skipped.
  """
  path = PurePath(filename)
  if not filename or '\x00' in filename or path.is_absolute() or '..' in path.parts:
    raise DataError(f'{where}: filename {filename!r} must be a relative path '
                    'inside the image folder')


LINKS_OUT_ENV = 'FACEFLAX_ALLOW_LINKS_OUT'  # '1': symlinks may point outside the dataset


def check_inside(images_dir: Path, filename: str, where, root_real: str) -> None:
  """An image (or a folder on its way) that is a symlink resolving outside the dataset folder
  (``root_real``: its real path) is refused like a '../' name; FACEFLAX_ALLOW_LINKS_OUT=1
  allows it (a folder that is a farm of links)."""
  if os.environ.get(LINKS_OUT_ENV) == '1':
    return
  target = Path(os.path.realpath(images_dir / filename))
  if not target.is_relative_to(root_real):
    raise DataError(f'{where}: {filename!r} is a link to {target}, outside the dataset folder '
                    f'{images_dir.parent} ({LINKS_OUT_ENV}=1 allows such links)')


def _warn_repeats(csv_path, rows, lines, keep, split) -> None:
  """Warns (log and results.json) about a file listed twice in ``split``, with conflicting
  labels, or also listed in another split (leakage between training and evaluation)."""
  first, twice, conflicting = {}, [], []
  for i in keep:
    name = rows[i]['filename']
    if name in first:
      twice.append(f'{name} (lines {lines[first[name]]} and {lines[i]})')
      labels = lambda r: {k: v for k, v in r.items() if k != 'filename'}
      if labels(rows[first[name]]) != labels(rows[i]):
        conflicting.append(twice[-1])
    else:
      first[name] = i
  if twice:
    bad_data.warn('files listed more than once', csv_path, len(twice), twice[0])
  if conflicting:
    bad_data.warn('files listed more than once with different labels', csv_path,
                  len(conflicting), conflicting[0])
  if split is not None and rows and 'split' in rows[0]:
    elsewhere = {}
    for i, row in enumerate(rows):
      if split_key(row['split']) != split_key(split) and row['filename'] in first:
        elsewhere.setdefault(row['filename'], (lines[i], row['split']))
    if elsewhere:
      name, (line, other) = next(iter(elsewhere.items()))
      bad_data.warn(f'files of split {split_key(split)!r} also listed in another split '
                    '(leakage between training and evaluation)', csv_path, len(elsewhere),
                    f'{name} (line {line}, split {other!r})')


def csv_rows(reader, path, num_fields):
  """(where, row) of each non-blank row left in a csv.reader; another field count raises."""
  for row in reader:
    if not any(field.strip() for field in row):
      continue
    where = f'{path}: line {reader.line_num}'
    if len(row) != num_fields:
      raise DataError(f'{where}: expected {num_fields} fields, got {len(row)}')
    yield where, row


def load_array(path, mmap_mode=None) -> np.ndarray:
  """A plain ``.npy`` array (one row per labels.csv row); never unpickles: data files are untrusted."""
  try:
    return np.load(path, mmap_mode=mmap_mode, allow_pickle=False)
  except (OSError, ValueError, EOFError) as e:
    raise DataError(f'{path}: not a readable plain .npy array ({type(e).__name__}: {e})') from None


def screen_files(examples: Examples, where, *, colour_set=True) -> Examples:
  """``examples`` whose image files exist and decode (``images.screen``); bad ones raise or are skipped.

  A store's records were screened when it was prepared: nothing to do.
  """
  if examples.store is not None:
    return examples
  keep = images.screen(examples.paths, str(where), colour_set=colour_set)
  return examples if keep.all() else examples.select(keep)


def drop_bad_rows(examples: Examples, whys, where, kind) -> Examples:
  """``examples`` without the rows whose ``whys`` entry is not None (DataError unless skipping).

  For label checks that need the task's knowledge (ranges, class counts).
  """
  keep = bad_data.screen(str(where), kind, examples.paths, whys)
  return examples if keep.all() else examples.select(keep)


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


def split_key(value) -> str:
  """How split names compare: surrounding spaces and letter case are ignored (' Train' is
  'train'), so a near-miss in a hand-edited labels.csv is not silently left out."""
  return str(value).strip().casefold()


def in_split(examples: 'Examples', split: str) -> np.ndarray:
  """Which ``examples`` belong to ``split`` (all of them without a split column)."""
  if 'split' not in examples.labels:
    return np.ones(len(examples), bool)
  return np.asarray([split_key(v) == split_key(split) for v in examples.labels['split']], bool)


def _log_other_splits(where, split, values, kept: int):
  others = {}
  for v in values:
    if split_key(v) != split_key(split):
      others[split_key(v)] = others.get(split_key(v), 0) + 1
  if others:
    logging.info('%s: %d rows of split %r; %d rows in other splits (%s)', where, kept, split,
                 sum(others.values()), ', '.join(f'{k!r}: {n}' for k, n in sorted(others.items())))


def _read_csv(csv_path):
  """Returns (columns, rows, line numbers); line numbers are 1-based, as in an editor."""
  with open_text(csv_path) as f:
    reader = csv.DictReader(f)
    try:
      columns = reader.fieldnames or []
      duplicated = sorted({c for c in columns if columns.count(c) > 1})
      if duplicated:  # DictReader would keep only the last of them.
        raise DataError(f'{csv_path}: line 1: duplicated column(s) {duplicated}')
      if 'filename' not in columns:
        raise DataError(f'{csv_path}: no "filename" column (columns: {columns})')
      rows, lines = [], []
      for row in reader:
        if None in row or None in row.values():
          raise DataError(f'{csv_path}: line {reader.line_num}: expected '
                          f'{len(columns)} fields')
        rows.append(row)
        lines.append(reader.line_num)
    except csv.Error as e:
      raise DataError(f'{csv_path}: line {reader.line_num}: {e}') from None
  if not rows:
    raise DataError(f'{csv_path}: no rows')
  return columns, rows, lines


def _label_problem(row, label_columns):
  """What is wrong with the label values of one csv row, or None."""
  for column in label_columns:
    number = _parse_float(row[column])
    if number is None or not math.isfinite(number):
      return f'column {column!r} needs a finite number, got {row[column]!r}'
  return None


def read_folder(root, split=None, *, label_columns=(), check_files=True) -> Examples:
  """Reads a folder-format dataset, optionally restricted to one `split`.

  Raises DataError (naming the file, line, column or value) for: a missing
  folder or labels.csv; a file that is not UTF-8 CSV, has duplicated columns,
  no "filename" column, a row with the wrong number of fields or no rows; a
  missing label column; a split no row has; a filename that is absolute or
  climbs out of images/. Per example (skipped instead when ``bad_data`` skips):
  a label of ``label_columns`` that is not a finite number and, with
  ``check_files``, an image file that is missing, not a decodable JPEG / PNG /
  BMP / GIF / WEBP, or greyscale among colour images. Only the rows of
  ``split`` are checked. Label columns are float32; other columns float32 when
  every value is a number (empty -> NaN), else strings.
  """
  root = Path(root).expanduser().absolute()
  if records.is_store(root) or records.is_insightface_pack(root):
    return read_store(root, split, label_columns=label_columns)
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
      bad_data.warn('rows used for every split (no "split" column: a model scored on it is '
                    'scored on what it trained on)', csv_path, len(rows), f'split {split!r}')
    else:
      keep = [i for i, row in enumerate(rows) if split_key(row['split']) == split_key(split)]
      if not keep:
        available = sorted({split_key(row['split']) for row in rows})
        raise DataError(f'{csv_path}: no rows with split {split!r}; '
                        f'available splits: {available}')
      _log_other_splits(csv_path, split, [row['split'] for row in rows], len(keep))

  root_real = os.path.realpath(root)
  for i in keep:
    check_relative(rows[i]['filename'], f'{csv_path}: line {lines[i]}')
    check_inside(images_dir, rows[i]['filename'], f'{csv_path}: line {lines[i]}', root_real)
  _warn_repeats(csv_path, rows, lines, keep, split)
  good = bad_data.screen(str(csv_path), 'bad label value(s)', [f'line {lines[i]}' for i in keep],
                         [_label_problem(rows[i], label_columns) for i in keep])
  keep = [i for i, ok in zip(keep, good) if ok]

  # Types are inferred on all rows so a column has the same dtype in every split.
  labels = {c: _column_array([row[c] for row in rows])[keep]
            for c in columns if c != 'filename' and c not in label_columns}
  labels.update({c: np.asarray([float(rows[i][c]) for i in keep], np.float32)
                 for c in label_columns})
  labels = {c: labels[c] for c in columns if c in labels}  # csv column order
  paths = tuple(str(images_dir / rows[i]['filename']) for i in keep)
  examples = Examples(root.name, paths, labels, np.asarray(keep, int))
  return screen_files(examples, csv_path) if check_files else examples


def read_store(root, split=None, *, label_columns=()) -> Examples:
  """``read_folder`` of a record store (``records``): the same selection and label checks,
  from the store's memory-mapped columns, without touching an image."""
  store = records.open_store(root)
  where = store.manifest_path
  names = store.column_names
  for column in label_columns:
    if column not in names:
      raise DataError(f'{where}: no column {column!r} (columns: {names})')
    if store.column(column).dtype.kind not in 'fiu':
      raise DataError(f'{where}: column {column!r} is not numeric')
  keep = np.arange(len(store))
  if split is not None:
    if 'split' not in names:
      logging.warning('%s has no "split" column; using all %d records for split %r.',
                      where, len(store), split)
    else:
      values, codes = np.unique(store.column('split'), return_inverse=True)  # a few names
      keys = np.asarray([split_key(v) for v in values])
      keep = np.flatnonzero(keys[codes] == split_key(split))
      if not len(keep):
        raise DataError(f'{where}: no records with split {split!r}; available splits: '
                        f'{sorted(set(keys.tolist()))}')
      _log_other_splits(where, split, keys[codes], len(keep))
  # Per-row arrays (landmarks, embeddings) stay in the store: read where needed.
  labels = {c: np.asarray(store.column(c)[keep]) for c in names
            if c not in ('filename', 'row') and store.column(c).ndim == 1}
  for c in label_columns:
    labels[c] = labels[c].astype(np.float32)
  examples = Examples(Path(root).name, records.RecordNames(store, keep), labels, keep, store)
  whys = np.full(len(keep), None, object)
  for c in label_columns:
    bad = ~np.isfinite(labels[c])
    whys[bad] = f'column {c!r} needs a finite number'
  good = bad_data.screen(str(where), 'bad label value(s)', examples.paths, whys)
  return examples if good.all() else examples.select(good)
