"""Record stores: a dataset's encoded images in random-access files, its labels as columns.

A store is what training streams from when a split is too big to decode into memory
(README "Data at scale"). It is a folder::

  manifest.json          what is stored, the files' sizes and times, the source it was
                         prepared from and what screening found
  columns/<name>.npy     one row per record, memory-mapped: the labels, 'filename' (the
                         source's name of the image) and, for a folder source, 'split'
                         and 'row' (its labels.csv row)
  images-00000-of-00004.array_record   the encoded image bytes, as the source had them

Three backends hold the bytes: ``array_record`` shards written by ``prepare_folder``
(the format TFDS and Grain read); ``tfds``: the array_record shards of a TFDS dataset,
read in place, each record a serialized tf.train.Example whose 'image' feature holds
the encoded image (``index_tfds``); and ``recordio``: an insightface pack's own
``train.rec`` (MXNet RecordIO), read in place at the offsets its ``train.idx`` gives,
so the 494k CASIA-WebFace faces are not copied (``prepare_insightface``).

Every image is screened once, when the store is prepared (the checks of
``images.screen``, with the ``data.skip_bad`` policy); a run reads the manifest instead.
Opening a store checks, before any work, that each data file has the size and time the
manifest recorded (a truncated or rewritten shard, a manifest older than its data) and
that a folder source has not changed since: each problem is a DataError naming the file.
"""
import concurrent.futures
import dataclasses
import datetime
import hashlib
import json
import os
import struct
import threading
from pathlib import Path

from absl import logging
import numpy as np

from faceflax import progress
from faceflax.data import bad_data, images
from faceflax.data.errors import DataError

MANIFEST = 'manifest.json'
FORMAT = 'faceflax-records'
VERSION = 1
SHARD_PATTERN = 'images-{:05d}-of-{:05d}.array_record'
INDEX_FOLDER = 'faceflax_records'  # the store of a pack or TFDS dataset, inside its folder
# ArrayRecord groups records into chunks; one record per chunk makes a random read
# decompress only that record (the setting TFDS and Grain use for random access).
_WRITER_OPTIONS = 'group_size:1'
_READER_OPTIONS = 'readahead_buffer_size:0'  # random access: no sequential read-ahead


# ----------------------------------------------------------------------------- reading

def is_store(root) -> bool:
  return (Path(root) / MANIFEST).is_file()


def is_insightface_pack(root) -> bool:
  return (Path(root) / 'train.rec').is_file() and (Path(root) / 'train.idx').is_file()


def _file_facts(path) -> dict:
  st = os.stat(path)
  return {'bytes': st.st_size, 'mtime_ns': st.st_mtime_ns}


def _check_unchanged(path, recorded: dict, manifest_path):
  """DataError unless ``path`` still has the size and time recorded at prepare time."""
  if not os.path.isfile(path):
    raise DataError(f'{path}: missing (listed in {manifest_path})')
  now = _file_facts(path)
  if now['bytes'] != recorded['bytes']:
    raise DataError(f'{path}: {now["bytes"]} bytes, but {manifest_path} records '
                    f'{recorded["bytes"]}: the file was truncated or rewritten after the store '
                    'was prepared; prepare it again (python -m faceflax.data.prepare)')
  if now['mtime_ns'] != recorded['mtime_ns']:
    raise DataError(f'{path}: modified after {manifest_path} was written (the manifest is '
                    'older than its data); prepare the store again '
                    '(python -m faceflax.data.prepare)')


def _labels_fingerprint(csv_path) -> dict:
  data = Path(csv_path).read_bytes()
  return {'labels_csv': str(csv_path), 'sha256': hashlib.sha256(data).hexdigest()}


class RecordStore:
  """An opened store: ``read(indices)`` gives encoded image bytes; ``column(name)`` the labels.

  Readers open lazily and per thread, so tf.data's ``numpy_function`` can read from
  several threads; nothing is held per record except the memory-mapped columns (and each
  open ArrayRecord reader's index of its shard).
  """

  def __init__(self, root):
    self.root = Path(root).expanduser().absolute()
    self.manifest_path = self.root / MANIFEST
    try:
      manifest = json.loads(self.manifest_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
      raise DataError(f'{self.manifest_path}: not a readable store manifest ({e})') from None
    if not isinstance(manifest, dict) or manifest.get('format') != FORMAT:
      raise DataError(f'{self.manifest_path}: not a faceflax record store manifest')
    if manifest.get('version') != VERSION:
      raise DataError(f'{self.manifest_path}: version {manifest.get("version")!r}; this '
                      f'faceflax reads version {VERSION}: prepare the store again')
    self.manifest = manifest
    self.backend = manifest['backend']
    self.num_records = int(manifest['num_records'])
    self.shards = [self._path(s['path']) for s in manifest['shards']]
    self._check()
    self._columns = {}
    self._local = threading.local()

  def _path(self, name) -> Path:
    return self.root / name  # absolute names (a pack's train.rec) stay as they are

  def _check(self):
    for shard, path in zip(self.manifest['shards'], self.shards):
      _check_unchanged(path, shard, self.manifest_path)
    if self.backend == 'recordio':
      _check_unchanged(self._path(self.manifest['index']['path']), self.manifest['index'],
                       self.manifest_path)
    elif self.backend in ('array_record', 'tfds'):
      counts = np.asarray([s['num_records'] for s in self.manifest['shards']], np.int64)
      if counts.sum() != self.num_records:
        raise DataError(f'{self.manifest_path}: shards hold {counts.sum()} records, the '
                        f'manifest says {self.num_records}')
      self._starts = np.concatenate([[0], np.cumsum(counts)])
    else:
      raise DataError(f'{self.manifest_path}: unknown backend {self.backend!r}')
    source = self.manifest.get('source', {})
    csv_path = source.get('labels_csv')
    if csv_path and os.path.isfile(csv_path):
      if _labels_fingerprint(csv_path)['sha256'] != source['sha256']:
        raise DataError(f'{csv_path} changed after the store {self.root} was prepared from '
                        'it (the manifest is older than its data); prepare it again')
    for name in self.manifest['columns']:
      path = _column_path(self.root, name)
      try:
        column = np.load(path, mmap_mode='r', allow_pickle=False)
      except (OSError, ValueError) as e:
        raise DataError(f'{path}: not a readable column of the store ({e})') from None
      if len(column) != self.num_records:
        raise DataError(f'{path}: {len(column)} rows for {self.num_records} records')

  def __len__(self):
    return self.num_records

  @property
  def column_names(self) -> list[str]:
    return [c for c in self.manifest['columns'] if not c.startswith('_')]

  def column(self, name) -> np.ndarray:
    if name not in self._columns:
      if name not in self.manifest['columns']:
        raise DataError(f'{self.root}: no column {name!r} (columns: {self.column_names})')
      self._columns[name] = np.load(_column_path(self.root, name), mmap_mode='r')
    return self._columns[name]

  def describe(self, index) -> str:
    """Where record ``index`` lives, for error messages: shard, record and source name."""
    name = str(self.column('filename')[index])
    if self.backend == 'recordio':
      offset = int(self.column('_offset')[index])
      return f'{self.shards[0]} record {index} at byte {offset} ({name})'
    shard = int(np.searchsorted(self._starts, index, side='right')) - 1
    return (f'{self.shards[shard]} record {index - self._starts[shard]} '
            f'(store record {index}, {name})')

  def read(self, indices) -> list[bytes]:
    """Encoded image bytes of records ``indices`` (any order, repeats allowed)."""
    indices = np.asarray(indices, np.int64).reshape(-1)
    if len(indices) and (indices.min() < 0 or indices.max() >= self.num_records):
      raise IndexError(f'{self.root}: record index out of range 0..{self.num_records - 1}')
    if self.backend == 'recordio':
      return [self._read_recordio(int(i)) for i in indices]
    out = [b''] * len(indices)
    shard_of = np.searchsorted(self._starts, indices, side='right') - 1
    for shard in np.unique(shard_of):
      where = np.flatnonzero(shard_of == shard)
      local = (indices[where] - self._starts[shard]).tolist()
      for i, data in zip(where, self._reader(shard).read(local)):
        out[i] = data
    if self.backend == 'tfds':
      out = [_example_image(data, lambda i=i: self.describe(int(indices[i])))
             for i, data in enumerate(out)]
    return out

  def _reader(self, shard):
    readers = self._local.__dict__.setdefault('readers', {})
    if shard not in readers:
      from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
      try:
        readers[shard] = array_record_module.ArrayRecordReader(str(self.shards[shard]),
                                                               _READER_OPTIONS)
      except Exception as e:  # pylint: disable=broad-except  # the C++ reader's errors vary
        raise DataError(f'{self.shards[shard]}: not a readable ArrayRecord shard ({e})') from None
    return readers[shard]

  def _read_recordio(self, index) -> bytes:
    fd = self._local.__dict__.get('fd')
    if fd is None:
      fd = self._local.fd = os.open(self.shards[0], os.O_RDONLY)
    offset = int(self.column('_offset')[index])
    record = read_recordio_record(fd, offset, lambda: self.describe(index))
    return record.image


@dataclasses.dataclass(frozen=True)
class RecordImages:
  """The images of records ``indices`` of ``store``, in that order (what pipelines read)."""
  store: RecordStore
  indices: np.ndarray

  def __len__(self):
    return len(self.indices)

  def read(self, positions) -> list[bytes]:
    return self.store.read(self.indices[np.asarray(positions, np.int64)])

  def describe(self, position) -> str:
    return self.store.describe(int(self.indices[position]))

  def take(self, positions) -> 'RecordImages':
    return RecordImages(self.store, self.indices[positions])


class RecordNames:
  """The source names ('filename' column) of records ``indices``, read when asked for.

  Stands for ``Examples.paths`` of a store: a tuple of a million names would cost more
  memory than the rest of a run's input.
  """

  def __init__(self, store: RecordStore, indices):
    self.store, self.indices = store, np.asarray(indices, np.int64)

  def __len__(self):
    return len(self.indices)

  def __getitem__(self, i):
    if isinstance(i, slice):
      return [self[j] for j in range(*i.indices(len(self)))]
    return str(self.store.column('filename')[self.indices[i]])

  def __iter__(self):
    return (self[i] for i in range(len(self)))


# ----------------------------------------------------------------------------- MXNet RecordIO

RECORDIO_MAGIC = 0xCED7230A
_IR_HEADER = struct.Struct('<IfQQ')  # flag, label, id, id2 (mxnet.recordio.IRHeader)


@dataclasses.dataclass(frozen=True)
class RecordIORecord:
  flag: int
  label: np.ndarray  # float32: one value when flag == 0, else `flag` values
  id: int
  image: bytes


def read_recordio_record(fd, offset: int, where) -> RecordIORecord:
  """The record at byte ``offset`` of a ``.rec`` file opened as ``fd``.

  The layout (mxnet/recordio.py, dmlc-core recordio.h): uint32 magic 0xced7230a, uint32
  with the continuation flag in its top 3 bits and the length in the other 29, the
  payload padded to 4 bytes. The payload of an image record starts with the IRHeader
  (uint32 flag, float32 label, uint64 id, uint64 id2), then ``flag`` float32 labels when
  flag > 0, then the encoded image. ``where()`` names the record in errors.
  """
  head = os.pread(fd, 8, offset)
  if len(head) < 8:
    raise DataError(f'{where()}: the file ends inside the record header (truncated .rec, '
                    'or a .idx that disagrees with its .rec)')
  magic, lrecord = struct.unpack('<II', head)
  if magic != RECORDIO_MAGIC:
    raise DataError(f'{where()}: no RecordIO record starts there (magic {magic:#x}): '
                    'the .idx disagrees with its .rec')
  cflag, length = lrecord >> 29, lrecord & ((1 << 29) - 1)
  if cflag:
    raise DataError(f'{where()}: a multi-part RecordIO record (cflag {cflag}), which '
                    'image packs do not use')
  payload = os.pread(fd, length, offset + 8)
  if len(payload) < length or length < _IR_HEADER.size:
    raise DataError(f'{where()}: the record is truncated ({len(payload)} of {length} bytes)')
  flag, label, id_, _ = _IR_HEADER.unpack_from(payload)
  start = _IR_HEADER.size
  if flag > 0:
    if start + 4 * flag > length:
      raise DataError(f'{where()}: header claims {flag} labels, more than the record holds')
    labels = np.frombuffer(payload, np.float32, flag, start)
    start += 4 * flag
  else:
    labels = np.asarray([label], np.float32)
  return RecordIORecord(flag, labels, id_, payload[start:])


def write_recordio(rec_path, idx_path, records):
  """Writes ``(key, flag, label(s), image bytes)`` records as mxnet.recordio.MXIndexedRecordIO
  with ``pack`` would (for tests and for converting other data into a pack)."""
  with open(rec_path, 'wb') as rec, open(idx_path, 'w') as idx:
    for key, flag, label, image in records:
      labels = np.atleast_1d(np.asarray(label, np.float32))
      header = _IR_HEADER.pack(flag, float(labels[0]) if flag == 0 else 0.0, key, 0)
      payload = header + (labels.tobytes() if flag > 0 else b'') + image
      idx.write(f'{key}\t{rec.tell()}\n')
      rec.write(struct.pack('<II', RECORDIO_MAGIC, len(payload)))
      rec.write(payload + b'\x00' * (-len(payload) % 4))


def _read_idx(idx_path, rec_size) -> tuple[np.ndarray, np.ndarray]:
  """(keys, offsets) of a ``.idx`` ('key<TAB>offset' per line), sorted by key."""
  keys, offsets = [], []
  with open(idx_path, encoding='ascii', errors='replace') as f:
    for line_number, line in enumerate(f, 1):
      if not line.strip():
        continue
      parts = line.split()
      if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise DataError(f'{idx_path}: line {line_number}: expected "key<TAB>offset", got '
                        f'{line.strip()[:60]!r}')
      key, offset = map(int, parts)
      if offset >= rec_size:
        raise DataError(f'{idx_path}: line {line_number}: offset {offset} is past the end of '
                        f'the .rec ({rec_size} bytes): the .idx disagrees with its .rec')
      keys.append(key)
      offsets.append(offset)
  if not keys:
    raise DataError(f'{idx_path}: no records listed')
  keys, offsets = np.asarray(keys, np.int64), np.asarray(offsets, np.int64)
  if len(np.unique(keys)) != len(keys):
    raise DataError(f'{idx_path}: a key is listed twice')
  order = np.argsort(keys)
  return keys[order], offsets[order]


# ----------------------------------------------------------------------------- preparing

def _screen_bytes(fetch, names, where, threads=4) -> np.ndarray:
  """Keep-mask over records: each must decode as the pipeline decodes it (``images``' checks)."""
  def problem(i):
    return images.bytes_problem(fetch(i))

  with concurrent.futures.ThreadPoolExecutor(threads) as pool:
    whys = list(progress.logged(pool.map(problem, range(len(names))),
                                f'{where}: screening images', len(names)))
  return bad_data.screen(where, 'unreadable image(s)', names, whys)


def _column_path(root, name) -> Path:
  return Path(root) / 'columns' / f'{name.replace("/", ".")}.npy'  # TFDS: 'attributes/Smiling'


def _write_columns(out, columns: dict) -> dict:
  (out / 'columns').mkdir(parents=True, exist_ok=True)
  dtypes = {}
  for name, values in columns.items():
    values = np.asarray(values)
    if values.dtype == object:
      values = values.astype(str)
    np.save(_column_path(out, name), values, allow_pickle=False)
    dtypes[name] = values.dtype.str
  return dtypes


def _write_manifest(out, manifest):
  manifest = {'format': FORMAT, 'version': VERSION,
              'created': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
              **manifest}
  tmp = out / (MANIFEST + '.tmp')
  tmp.write_text(json.dumps(manifest, indent=1) + '\n')
  os.replace(tmp, out / MANIFEST)  # the manifest appears last: a store is whole or absent


def _empty_out(out):
  out = Path(out).expanduser().absolute()
  if out.exists() and any(out.iterdir()):
    if not is_store(out):
      raise DataError(f'{out}: exists and is not an empty folder or a store: refusing to '
                      'write a store over it')
    raise DataError(f'{out}: already holds a store; delete it first to prepare it again')
  out.mkdir(parents=True, exist_ok=True)
  return out


def write_store(out, num_records, record_bytes, columns, *, source, screened,
                records_per_shard=100_000) -> Path:
  """Writes an array_record store: ``record_bytes(i)`` for i < ``num_records``, in
  shards of at most ``records_per_shard``, the ``columns`` (one row per record) and the
  manifest (``source``: where the data came from; ``screened``: what was checked)."""
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  out = _empty_out(out)
  num_shards = max(1, -(-num_records // records_per_shard))
  bounds = np.linspace(0, num_records, num_shards + 1).astype(int)
  shards = []
  tick = progress.counter(f'writing {out}', num_records)
  for s in range(num_shards):
    name = SHARD_PATTERN.format(s, num_shards)
    writer = array_record_module.ArrayRecordWriter(str(out / name), _WRITER_OPTIONS)
    for i in range(bounds[s], bounds[s + 1]):
      writer.write(record_bytes(i))
      tick()
    writer.close()
    shards.append({'path': name, 'num_records': int(bounds[s + 1] - bounds[s]),
                   **_file_facts(out / name)})
  _write_manifest(out, {'backend': 'array_record', 'num_records': int(num_records),
                        'shards': shards, 'columns': _write_columns(out, columns),
                        'source': source, 'screened': screened})
  logging.info('wrote %d records in %d shard(s) to %s', num_records, num_shards, out)
  return out


def _row_arrays(source, rows, columns) -> dict:
  """The folder's extra arrays (``<name>.npy``, one row per labels.csv row: landmarks,
  embeddings), at ``rows``, as columns named ``<name>``."""
  from faceflax.data import folder  # pylint: disable=g-import-not-at-top  # folder imports us
  num_rows = len(folder.read_folder(source, check_files=False))
  arrays = {}
  for path in sorted(source.glob('*.npy')):
    array = folder.load_array(path, mmap_mode='r')
    if array.ndim == 0 or len(array) != num_rows:
      logging.warning('%s: not stored (%s rows; labels.csv has %d)', path,
                      array.shape[:1] or 'no', num_rows)
      continue
    if path.stem in columns:
      raise DataError(f'{path}: its name clashes with the labels.csv column {path.stem!r}')
    arrays[path.stem] = np.asarray(array[rows])
  return arrays


def prepare_folder(source, out, *, records_per_shard=100_000) -> Path:
  """Writes the folder-format dataset ``source`` (every split) as an array_record store.

  Images are screened as ``read_folder`` screens them (bad ones raise, or are skipped
  and listed in the manifest with ``data.skip_bad``), then stored byte for byte. All
  labels.csv columns become columns, plus 'row' (the labels.csv row of each record) and
  each per-row array beside labels.csv (``landmarks86.npy`` -> column 'landmarks86').
  """
  from faceflax.data import folder  # pylint: disable=g-import-not-at-top  # folder imports us
  source = Path(source).expanduser().absolute()
  if is_store(source):
    raise DataError(f'{source} is already a record store')
  examples = folder.read_folder(source)
  columns = dict(examples.labels)
  columns['filename'] = [os.path.relpath(p, source / 'images') for p in examples.paths]
  columns['row'] = examples.rows.astype(np.int64)
  columns.update(_row_arrays(source, examples.rows, columns))
  return write_store(
      out, len(examples), lambda i: Path(examples.paths[i]).read_bytes(), columns,
      source={'kind': 'folder', 'dir': str(source),
              **_labels_fingerprint(source / 'labels.csv')},
      screened={'checked': 'every row of labels.csv',
                'skipped': bad_data.summary().get('data_skipped', {'count': 0})},
      records_per_shard=records_per_shard)


def prepare_insightface(pack, out=None) -> Path:
  """Indexes an insightface pack (``train.rec`` + ``train.idx``) as a recordio store.

  The images stay in ``train.rec``; the store holds their offsets, identities (from
  each record's header) and the manifest. ``out`` defaults to ``<pack>/faceflax_records``.
  Record 0 of a pack is a header whose first label is the first key that is not an image
  (identity-range records follow the images); without it every listed key is an image.
  """
  pack = Path(pack).expanduser().absolute()
  rec_path, idx_path = pack / 'train.rec', pack / 'train.idx'
  for path in (rec_path, idx_path):
    if not path.is_file():
      raise DataError(f'{path}: no such file (an insightface pack has train.rec and train.idx)')
  out = _empty_out(out or pack / INDEX_FOLDER)
  rec_size = rec_path.stat().st_size
  keys, offsets = _read_idx(idx_path, rec_size)
  fd = os.open(rec_path, os.O_RDONLY)
  try:
    where = lambda key, offset: lambda: f'{rec_path} record {key} at byte {offset}'
    first = read_recordio_record(fd, int(offsets[0]), where(keys[0], offsets[0]))
    if keys[0] == 0 and first.flag > 0:
      end = int(first.label[0])
      is_image = (keys > 0) & (keys < end)
    else:
      is_image = np.ones(len(keys), bool)
    keys, offsets = keys[is_image], offsets[is_image]
    identity = np.empty(len(keys), np.float32)
    for i, (key, offset) in enumerate(progress.logged(
        zip(keys.tolist(), offsets.tolist()), f'{rec_path}: reading headers', len(keys))):
      identity[i] = read_recordio_record(fd, offset, where(key, offset)).label[0]
    names = [f'train.rec#{k}' for k in keys.tolist()]
    fetch = lambda i: read_recordio_record(fd, int(offsets[i]), where(keys[i], offsets[i])).image
    keep = _screen_bytes(fetch, names, str(rec_path))
  finally:
    os.close(fd)
  columns = {'identity': identity[keep], 'filename': np.asarray(names)[keep],
             'split': np.full(int(keep.sum()), 'train'), '_offset': offsets[keep],
             'key': keys[keep]}
  _write_manifest(out, {
      'backend': 'recordio', 'num_records': int(keep.sum()),
      'shards': [{'path': str(rec_path), 'num_records': int(keep.sum()),
                  **_file_facts(rec_path)}],
      'index': {'path': str(idx_path), **_file_facts(idx_path)},
      'columns': _write_columns(out, columns),
      'source': {'kind': 'insightface', 'dir': str(pack)},
      'screened': {'checked': len(keep), 'skipped': int((~keep).sum())}})
  logging.info('indexed %d images of %d identities in %s', int(keep.sum()),
               len(np.unique(identity[keep])), out)
  return out


# ----------------------------------------------------------------------------- TFDS

def _example_image(serialized: bytes, where) -> bytes:
  """The encoded 'image' of a TFDS record (a serialized tf.train.Example)."""
  from tensorflow.core.example import example_pb2  # pylint: disable=g-import-not-at-top
  try:
    feature = example_pb2.Example.FromString(serialized).features.feature['image']
    return feature.bytes_list.value[0]
  except Exception as e:  # pylint: disable=broad-except  # DecodeError, IndexError
    raise DataError(f'{where()}: not a TFDS example with an encoded image ({e})') from None


def _example_values(serialized: bytes) -> dict:
  """Every feature of a TFDS record but the image: numbers, or text (utf-8)."""
  from tensorflow.core.example import example_pb2  # pylint: disable=g-import-not-at-top
  values = {}
  for key, feature in example_pb2.Example.FromString(serialized).features.feature.items():
    if key == 'image':
      continue
    kind = feature.WhichOneof('kind')
    items = list(getattr(feature, kind).value) if kind else []
    if len(items) != 1:  # sequences and empty features are no per-example label
      continue
    values[key] = items[0].decode('utf-8') if kind == 'bytes_list' else items[0]
  return values


def tfds_builder(name: str, data_dir: str):
  """The prepared TFDS builder ``name`` ('scut_fbp5500/cv1', ...) of ``data_dir``."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  import faceflax.data.tfds  # pylint: disable=g-import-not-at-top,unused-import  # registers ours
  try:
    builder = tfds.builder(name, data_dir=data_dir or None)
  except Exception as e:  # pylint: disable=broad-except  # DatasetNotFoundError, config errors
    raise DataError(f'data.tfds={name!r}: {e}') from None
  if not builder.is_prepared():
    raise DataError(f'data.tfds={name!r} is not built in {builder.data_dir}: run '
                    f'`python -m faceflax.data.tfds {name.split("/")[0]} --manual_dir=... '
                    f'--data_dir={data_dir or "~/tensorflow_datasets"}` first')
  return builder


def index_tfds(name: str, data_dir: str = '', out=None) -> Path:
  """Indexes the TFDS dataset ``name`` (built as array_record) as a store, once.

  Its shards are read in place; the index (every split, in TFDS's order, with a 'split'
  column and one column per scalar feature) goes to ``out``, by default
  ``<the dataset's version folder>/faceflax_records``. The images were screened by the
  faceflax reader that built the dataset. A rebuilt dataset (other shards, sizes or times)
  makes the index stale: ``open_store`` then says so, and ``tfds_store`` re-indexes.
  """
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  builder = tfds_builder(name, data_dir)
  info = builder.info
  if str(info.file_format.value) != 'array_record':
    raise DataError(f'data.tfds={name!r} in {builder.data_dir} is stored as '
                    f'{info.file_format.value}, which cannot be read by index: rebuild it '
                    'with --file_format=array_record (the default of python -m faceflax.data.tfds)')
  out = _empty_out(out or Path(builder.data_dir) / INDEX_FOLDER)
  shards, rows = [], []
  for split_name, split in info.splits.items():
    for path, length in zip(split.filepaths, split.shard_lengths):
      reader = array_record_module.ArrayRecordReader(str(path))
      if reader.num_records() != length:
        raise DataError(f'{path}: {reader.num_records()} records, the dataset info says {length}')
      for start in range(0, length, 1024):
        for data in reader.read(list(range(start, min(start + 1024, length)))):
          rows.append(dict(_example_values(data), split=split_name))
      reader.close()
      shards.append({'path': str(path), 'num_records': int(length), **_file_facts(path)})
  keys = sorted({k for row in rows for k in row} - {'split'})
  columns = {k: [row.get(k, np.nan) for row in rows] for k in keys}
  columns['split'] = [row['split'] for row in rows]
  columns.setdefault('filename', [f'{name}#{i}' for i in range(len(rows))])
  for key, values in columns.items():  # numbers as float32 (labels), text as str
    if not any(isinstance(v, str) for v in values):
      columns[key] = np.asarray(values, np.float32)
  _write_manifest(out, {
      'backend': 'tfds', 'num_records': len(rows), 'shards': shards,
      'columns': _write_columns(out, columns),
      'source': {'kind': 'tfds', 'name': name, 'dir': str(builder.data_dir)},
      'screened': {'checked': 'by the faceflax reader that built the TFDS dataset'}})
  logging.info('indexed %s: %d records in %d shards, in %s', name, len(rows), len(shards), out)
  return out


def tfds_store(name: str, data_dir: str = '') -> Path:
  """The store of TFDS dataset ``name``: its index, written on first use (or when stale)."""
  root = Path(tfds_builder(name, data_dir).data_dir) / INDEX_FOLDER
  if is_store(root):
    try:
      RecordStore(root)
      return root
    except DataError as e:
      logging.warning('re-indexing %s: %s', name, e)
      import shutil  # pylint: disable=g-import-not-at-top
      shutil.rmtree(root)
  return index_tfds(name, data_dir, root)


TFDS_PREFIX = 'tfds:'  # a dataset entry of a config naming a TFDS build: 'tfds:utkface'


def shared_tfds_store(name: str, data_dir: str = '') -> str:
  """``tfds_store`` in a multi-process run: process 0 indexes, the others then read."""
  from faceflax import distributed  # pylint: disable=g-import-not-at-top  # JAX only here
  return distributed.process_zero_first(lambda: str(tfds_store(name, data_dir)),
                                        f'tfds_index:{name}')


def dataset_path(entry: str, root: str = '', tfds_data_dir: str = '') -> str:
  """Where a config's dataset entry is read from: 'tfds:NAME[/CONFIG]' is that TFDS
  build's index (``tfds_data_dir``), anything else a folder, store or pack under ``root``
  (or an absolute path)."""
  if entry.startswith(TFDS_PREFIX):
    return shared_tfds_store(entry[len(TFDS_PREFIX):], tfds_data_dir)
  return os.path.join(root, entry)


def source_name(root) -> str:
  """The name of the dataset a store was made from ('scut_fbp5500' of a store prepared from
  that folder or indexed from its TFDS build): what picks the dataset's chip template."""
  source = json.loads((Path(root) / MANIFEST).read_text()).get('source', {})
  if source.get('kind') == 'tfds':
    return source['name'].split('/')[0]
  return Path(source.get('dir', root)).name


def open_store(root) -> RecordStore:
  """The store at ``root``, or the one prepared inside an insightface pack at ``root``."""
  root = Path(root).expanduser().absolute()
  if is_store(root):
    return RecordStore(root)
  if is_insightface_pack(root):
    if is_store(root / INDEX_FOLDER):
      return RecordStore(root / INDEX_FOLDER)
    raise DataError(f'{root} is an insightface pack without an index: run '
                    f'`python -m faceflax.data.prepare {root}` once (it reads every record '
                    f'header and screens every image, then writes {root / INDEX_FOLDER})')
  raise DataError(f'{root}: not a record store (no {MANIFEST})')
