"""Readers for age datasets in their downloaded layouts: UTKFace, MORPH II, Adience.

Every reader returns the same four labels, one row per image:
  'age'        float32 years. Adience only gives a range: its midpoint.
  'gender'     int32: 0 = male, 1 = female, -1 = unknown.
  'race'       int32, UTKFace's codes: 0 = White, 1 = Black, 2 = Asian,
               3 = Indian, 4 = Others; -1 = unknown (Adience has no race).
  'age_group'  int32, the 8 Adience groups 0..7 (ADIENCE_GROUPS); -1 where the
               dataset has exact ages instead (UTKFace, MORPH II).
The metrics leave labels < 0 out; losses need `labels >= 0` as their weights.
Malformed values raise DataError naming the file and the line and column (or,
for UTKFace, the field of the file name); nothing is guessed. Rows that are
well-formed but unusable (Adience ages 'None' or outside every group, UTKFace
names when `skip_malformed=True`) are skipped and returned for the caller to log.
"""

import csv
import hashlib
import os
from pathlib import Path
import re
from typing import NamedTuple

import numpy as np

from faceflax.data.errors import DataError
from faceflax.data.folder import (Examples, check_relative, csv_rows, drop_bad_rows, open_text,
                                  read_folder, read_text, screen_files)

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp')
MAX_AGE = 116  # UTKFace's range is 0..116; the other datasets lie inside it.
UNKNOWN = -1

_DIGITS = re.compile(r'[0-9]+')


class Loaded(NamedTuple):
  """Examples of one split plus the entries skipped while reading them."""
  examples: Examples
  skipped: tuple[str, ...]


def hash_fraction(key: str) -> float:
  """A number in [0, 1) fixed by `key` alone: splits do not depend on file order."""
  return int.from_bytes(hashlib.sha256(key.encode('utf-8')).digest()[:8], 'big') / 2 ** 64


def _check_split(split, valid, dataset):
  if split is not None and split not in valid:
    raise DataError(f'unknown {dataset} split {split!r}; valid: {valid} or None (all)')


def _examples(name, paths, labels):
  return Examples(name, tuple(paths), {
      'age': np.asarray(labels['age'], np.float32),
      'gender': np.asarray(labels['gender'], np.int32),
      'race': np.asarray(labels['race'], np.int32),
      'age_group': np.asarray(labels['age_group'], np.int32)})


def _is_image(filename):
  return filename.lower().endswith(IMAGE_EXTENSIONS)


# UTKFace: "[age]_[gender]_[race]_[date&time].jpg" (".jpg.chip.jpg" for the aligned crops).

UTKFACE_PATTERN = '[age]_[gender]_[race]_[date&time].jpg'
_UTKFACE_FIELDS = (('age', range(MAX_AGE + 1)), ('gender', range(2)), ('race', range(5)))


def parse_utkface_name(name) -> tuple[int, int, int]:
  """(age, gender, race) of a UTKFace file name (or path); DataError if malformed."""
  fields = os.path.basename(name).split('.', 1)[0].split('_')

  def fail(why):
    raise DataError(f'{name}: {why}; UTKFace file names are {UTKFACE_PATTERN}')

  # A few released files lack the race ("39_1_20170116174525125.jpg.chip.jpg").
  if len(fields) == 3 and _DIGITS.fullmatch(fields[2]) and len(fields[2]) > 2:
    fail('race field missing')
  if len(fields) != 4:
    fail(f'expected 4 "_"-separated fields, got {len(fields)}')
  values = []
  for (field, valid), text in zip(_UTKFACE_FIELDS, fields):
    if not _DIGITS.fullmatch(text):
      fail(f'{field} field {text!r} is not an integer')
    if int(text) not in valid:
      fail(f'{field} {int(text)} is outside {valid.start}..{valid.stop - 1}')
    values.append(int(text))
  if not _DIGITS.fullmatch(fields[3]):
    fail(f'date&time field {fields[3]!r} is not a number')
  return tuple(values)


def read_utkface(root, split=None, *, val_fraction=0.1, skip_malformed=False) -> Loaded:
  """Reads the UTKFace images under `root` (any depth); labels come from the names.

  The release has no official split: an image is 'val' when the hash of its
  file name falls below `val_fraction`, else 'train', so the split does not
  depend on the folder layout or on which other files are present. `split=None`
  reads all images. A malformed name raises DataError, unless
  `skip_malformed=True`: then those files are left out and returned in
  `skipped` (relative to `root`).
  """
  root = Path(root).expanduser().absolute()
  _check_split(split, ('train', 'val'), 'UTKFace')
  if not 0 <= val_fraction <= 1:
    raise DataError(f'val_fraction={val_fraction} must be in [0, 1]')
  if not root.is_dir():
    raise DataError(f'no such directory: {root}')
  found = sorted(os.path.relpath(os.path.join(folder, f), root)
                 for folder, _, files in os.walk(root, followlinks=True)
                 for f in files if _is_image(f))
  if not found:
    raise DataError(f'{root}: no images found')
  paths, skipped = [], []
  labels = {'age': [], 'gender': [], 'race': [], 'age_group': []}
  for relative in found:
    try:
      age, gender, race = parse_utkface_name(root / relative)
    except DataError:
      if not skip_malformed:
        raise
      skipped.append(relative)
      continue
    is_val = hash_fraction(os.path.basename(relative)) < val_fraction
    if split is not None and split != ('val' if is_val else 'train'):
      continue
    paths.append(str(root / relative))
    for key, value in zip(labels, (age, gender, race, UNKNOWN)):
      labels[key].append(value)
  if not paths:
    raise DataError(f'{root}: no well-formed UTKFace images in split {split!r} '
                    f'({len(found)} images, {len(skipped)} malformed, '
                    f'val_fraction={val_fraction})')
  return Loaded(screen_files(_examples('utkface', paths, labels), root), tuple(skipped))


# MORPH II: a CSV list with one row per image.

MORPH_PROTOCOLS = ('random_80_20',)
# Accepted header names (compared lower-cased, with spaces and '-' as '_').
_MORPH_COLUMNS = {
    'filename': ('filename', 'file_name', 'file', 'photo', 'image', 'image_path', 'img',
                 'path'),
    'age': ('age',),
    'gender': ('gender', 'sex'),
    'race': ('race', 'ethnicity'),
    'subject': ('id_num', 'subject', 'subject_id', 'person_id', 'id'),
}
_MORPH_GENDERS = {'m': 0, 'male': 0, 'f': 1, 'female': 1}
_MORPH_RACES = {'w': 0, 'white': 0, 'b': 1, 'black': 1, 'a': 2, 'asian': 2, 'i': 3,
                'indian': 3, 'h': 4, 'hispanic': 4, 'o': 4, 'other': 4, 'others': 4}


def _normalise_header(name):
  return re.sub(r'[\s\-]+', '_', name.strip().lower())


def _find_morph_csv(root, csv_path):
  if csv_path is not None:
    path = root / Path(csv_path).expanduser()
    if not path.is_file():
      raise DataError(f'no such file: {path}')
    return path
  found = sorted(root.glob('*.csv'))
  if len(found) != 1:
    raise DataError(f'{root}: expected one MORPH II list (*.csv), found '
                    f'{[p.name for p in found]}; pass csv_path')
  return found[0]


def _morph_columns(csv_path, header):
  """Maps our column names to their indices in `header`."""
  normalised = [_normalise_header(h) for h in header]
  columns = {}
  for key, aliases in _MORPH_COLUMNS.items():
    matches = [i for i, h in enumerate(normalised) if h in aliases]
    if len(matches) > 1:
      raise DataError(f'{csv_path}: columns {[header[i] for i in matches]} all look '
                      f'like the {key!r} column')
    if matches:
      columns[key] = matches[0]
  for key in ('filename', 'age'):
    if key not in columns:
      raise DataError(f'{csv_path}: no {key} column (accepted names: '
                      f'{_MORPH_COLUMNS[key]}; columns: {header})')
  return columns


def _morph_code(value, codes, where, column):
  code = codes.get(value.strip().lower())
  if code is None:
    raise DataError(f'{where}: column {column!r}: {value!r} is not one of '
                    f'{sorted(codes)} (numeric codes differ between MORPH lists, so '
                    'they are not accepted)')
  return code


def _parse_age(value, where, column):
  try:
    age = float(value)
  except ValueError:
    age = float('nan')
  if not 0 <= age <= MAX_AGE:  # Also rejects NaN.
    raise DataError(f'{where}: column {column!r}: age {value!r} is not a number in '
                    f'0..{MAX_AGE}')
  return age


def read_morph(root, split='train', protocol='random_80_20', *, csv_path=None,
               test_fraction=0.2, check_files=True) -> Examples:
  """Reads MORPH II from its CSV list; image paths in the list are relative to `root`.

  The list is `csv_path` (relative to `root`), else the only *.csv in `root`.
  Header names are matched liberally (e.g. 'photo' or 'filename', 'id_num' or
  'subject'); values strictly: ages in 0..MAX_AGE, gender M/F, race as letters
  or words (W, B, A, I, H/O -> 0..4). A missing gender or race column gives -1.
  Protocol 'random_80_20': a subject is in 'test' when the hash of its id falls
  below `test_fraction`, so no subject is in both splits; without a subject
  column each image is hashed by its file name instead. `split=None` reads all.
  """
  root = Path(root).expanduser().absolute()
  if protocol not in MORPH_PROTOCOLS:
    raise DataError(f'unknown MORPH II protocol {protocol!r}; valid: {MORPH_PROTOCOLS}')
  _check_split(split, ('train', 'test'), 'MORPH II')
  if not 0 <= test_fraction <= 1:
    raise DataError(f'test_fraction={test_fraction} must be in [0, 1]')
  if not root.is_dir():
    raise DataError(f'no such directory: {root}')
  path = _find_morph_csv(root, csv_path)
  with open_text(path) as f:
    reader = csv.reader(f)
    header = next(reader, None)
    if not header:
      raise DataError(f'{path}: empty file')
    columns = _morph_columns(path, header)
    names = {key: header[i] for key, i in columns.items()}
    paths = []
    labels = {'age': [], 'gender': [], 'race': [], 'age_group': []}
    num_rows = 0
    for where, row in csv_rows(reader, path, len(header)):
      num_rows += 1
      filename = row[columns['filename']].strip()
      check_relative(filename, where)
      key = row[columns['subject']].strip() if 'subject' in columns else Path(filename).name
      if not key:
        raise DataError(f'{where}: column {names["subject"]!r} is empty')
      is_test = hash_fraction(key) < test_fraction
      age = _parse_age(row[columns['age']], where, names['age'])
      gender, race = (
          _morph_code(row[columns[c]], codes, where, names[c]) if c in columns else UNKNOWN
          for c, codes in (('gender', _MORPH_GENDERS), ('race', _MORPH_RACES)))
      if split is not None and split != ('test' if is_test else 'train'):
        continue
      paths.append(str(root / filename))
      for name, value in zip(labels, (age, gender, race, UNKNOWN)):
        labels[name].append(value)
  if not num_rows:
    raise DataError(f'{path}: no rows')
  if not paths:
    raise DataError(f'{path}: no rows in split {split!r} (test_fraction={test_fraction})')
  examples = _examples('morph2', paths, labels)
  return screen_files(examples, path) if check_files else examples


# Adience: fold_{0..4}_data.txt lists, faces/<user_id>/<prefix>.<face_id>.<original_image>.

ADIENCE_GROUPS = ((0, 2), (4, 6), (8, 13), (15, 20), (25, 32), (38, 43), (48, 53), (60, 100))
ADIENCE_PROTOCOLS = tuple(f'fold{k}' for k in range(5))
_ADIENCE_COLUMNS = ('user_id', 'original_image', 'face_id', 'age', 'gender')
_ADIENCE_GENDERS = {'m': 0, 'f': 1, 'u': UNKNOWN, '': UNKNOWN, 'none': UNKNOWN}
_ADIENCE_UNKNOWN_AGES = ('', 'none')
_RANGE = re.compile(r'\(\s*([0-9]+)\s*,\s*([0-9]+)\s*\)')


def parse_adience_age(text) -> tuple[float, float] | None:
  """(low, high) years of an Adience age field: '(25, 32)' or '35'; None if unknown."""
  text = text.strip()
  if text.lower() in _ADIENCE_UNKNOWN_AGES:
    return None
  match = _RANGE.fullmatch(text)
  if match:
    low, high = int(match[1]), int(match[2])
  elif _DIGITS.fullmatch(text):
    low = high = int(text)
  else:
    raise ValueError(f"age {text!r} is neither '(low, high)' nor a whole number")
  if low > high:
    raise ValueError(f'age range {text!r} is reversed')
  return float(low), float(high)


def adience_age_group(low, high) -> int | None:
  """Index of the standard group containing [low, high], None if none does.

  Containment only: the few odd labels of the fold files ('(38, 48)',
  '(8, 23)', single ages between groups such as '35') match no group.
  """
  for group, (group_low, group_high) in enumerate(ADIENCE_GROUPS):
    if group_low <= low and high <= group_high:
      return group
  return None


def _read_adience_fold(path, images_dir, image_prefix, paths, labels, skipped):
  if not path.is_file():
    raise DataError(f'no such file: {path}')
  lines = read_text(path).splitlines()
  header = [h.strip() for h in lines[0].split('\t')] if lines else []
  missing = [c for c in _ADIENCE_COLUMNS if c not in header]
  if missing:
    raise DataError(f'{path}: line 1: no column(s) {missing} (columns: {header})')
  index = {c: header.index(c) for c in _ADIENCE_COLUMNS}
  for line_number, line in enumerate(lines[1:], 2):
    if not line.strip():
      continue
    fields = [f.strip() for f in line.split('\t')]
    where = f'{path}: line {line_number}'
    if len(fields) <= max(index.values()):
      raise DataError(f'{where}: expected at least {max(index.values()) + 1} '
                      f'tab-separated fields, got {len(fields)}')
    user_id, original, face_id = (fields[index[c]] for c in _ADIENCE_COLUMNS[:3])
    if not _DIGITS.fullmatch(face_id):
      raise DataError(f'{where}: column face_id: {face_id!r} is not a whole number')
    filename = f'{user_id}/{image_prefix}.{face_id}.{original}'
    check_relative(filename, where)
    try:
      age_range = parse_adience_age(fields[index['age']])
    except ValueError as e:
      raise DataError(f'{where}: column age: {e}') from None
    gender = _ADIENCE_GENDERS.get(fields[index['gender']].lower())
    if gender is None:
      raise DataError(f'{where}: column gender: {fields[index["gender"]]!r} is not one '
                      f'of m, f, u (or empty)')
    group = None if age_range is None else adience_age_group(*age_range)
    if group is None:
      skipped.append(f'{where}: age {fields[index["age"]]!r}')
      continue
    paths.append(str(images_dir / filename))
    for key, value in zip(labels, (sum(age_range) / 2, gender, UNKNOWN, group)):
      labels[key].append(value)


def read_adience(root, split='train', protocol='fold0', *, faces_dir='faces',
                 image_prefix='coarse_tilt_aligned_face', check_files=True) -> Loaded:
  """Reads Adience from its fold lists; protocol 'foldK' tests on fold K, trains on the rest.

  Rows whose age is unknown ('None') or matches none of the 8 groups are
  skipped and returned in `skipped` ("<file>: line <n>: age '<value>'").
  `faces_dir='aligned', image_prefix='landmark_aligned_face'` reads the other
  alignment of the release. `split=None` reads all five folds.
  """
  root = Path(root).expanduser().absolute()
  if protocol not in ADIENCE_PROTOCOLS:
    raise DataError(f'unknown Adience protocol {protocol!r}; valid: {ADIENCE_PROTOCOLS}')
  _check_split(split, ('train', 'test'), 'Adience')
  images_dir = root / faces_dir
  for path in (root, images_dir):
    if not path.is_dir():
      raise DataError(f'no such directory: {path}')
  test_fold = int(protocol[-1])
  if split is None:
    folds = list(range(5))
  elif split == 'test':
    folds = [test_fold]
  else:
    folds = [k for k in range(5) if k != test_fold]
  paths, skipped = [], []
  labels = {'age': [], 'gender': [], 'race': [], 'age_group': []}
  for k in folds:
    _read_adience_fold(root / f'fold_{k}_data.txt', images_dir, image_prefix, paths, labels,
                       skipped)
  if not paths:
    raise DataError(f'{root}: no usable rows in folds {folds} ({len(skipped)} skipped)')
  examples = _examples('adience', paths, labels)
  if check_files:
    examples = screen_files(examples, f'{root} (folds {folds})')
  return Loaded(examples, tuple(skipped))


# ----------------------------------------------------------------------------- the project's folder format

def _class_problem(value, column: str, num: int) -> str | None:
  """None for a class code in -1..num-1 or an empty value (unknown), else what is wrong."""
  number = value
  if isinstance(value, str):
    if not value.strip():
      return None
    try:
      number = float(value)
    except ValueError:
      number = None
  if number is not None and np.isnan(number):
    return None
  if number is not None and np.isfinite(number) and number == round(number) and -1 <= number < num:
    return None
  shown = repr(value) if isinstance(value, str) else f'{value:g}'
  return (f'column {column!r} must hold integer codes 0..{num - 1} (empty or -1 = unknown), '
          f'got {shown}')


def _class_codes(examples: Examples, column: str) -> np.ndarray:
  """A checked class column as int32, empty or -1 = unknown (-1); absent = all unknown."""
  if column not in examples.labels:
    return np.full(len(examples), UNKNOWN, np.int32)
  values = [float(v) if not isinstance(v, str) or v.strip() else np.nan
            for v in examples.labels[column]]
  return np.nan_to_num(np.asarray(values, np.float64), nan=UNKNOWN).astype(np.int32)


def read_folder_format(data_dir, split=None) -> Examples:
  """The project's folder format (labels.csv: filename, age, [gender, race, age_group, split])
  with the four labels of the other readers; bad class codes are bad rows."""
  examples = read_folder(data_dir, split, label_columns=('age',))
  where = os.path.join(data_dir, 'labels.csv')
  classes = {'gender': 2, 'race': 5, 'age_group': len(ADIENCE_GROUPS)}
  for column, num in classes.items():
    if column in examples.labels:
      examples = drop_bad_rows(
          examples, [_class_problem(v, column, num) for v in examples.labels[column]], where,
          f'bad {column} code(s)')
  labels = {'age': examples.labels['age'].astype(np.float32),
            **{c: _class_codes(examples, c) for c in classes}}
  return Examples(examples.name, examples.paths, labels, examples.rows, examples.store)


FORMATS = ('folder', 'utkface', 'morph', 'adience')


def read(data_dir, fmt: str, split=None, protocol: str = '') -> Loaded:
  """``split`` of ``data_dir`` in format ``fmt`` (FORMATS); ``protocol`` '' = the format's
  default (MORPH II: random_80_20, Adience: fold0; the others have fixed splits)."""
  if fmt == 'folder':
    return Loaded(read_folder_format(data_dir, split), ())
  if fmt == 'utkface':
    return read_utkface(data_dir, split, skip_malformed=True)
  if fmt == 'morph':
    return Loaded(read_morph(data_dir, split, protocol or 'random_80_20'), ())
  if fmt == 'adience':
    return read_adience(data_dir, split, protocol or 'fold0')
  raise ValueError(f'data.format={fmt!r}: allowed values are {", ".join(FORMATS)}')
