"""Deterministic, resumable tf.data input pipelines that yield numpy batches.

Images come from files (a folder-format dataset), from a record store
(``records``: array_record shards or an insightface pack) or from memory
(``EncodedImages``: a verification ``.bin``); labels are numpy columns, gathered
per batch. Two ways to feed training (``data.input``):

- ``cache``: the whole split is decoded and resized once (``cache_pp``) into one
  in-memory element; the fastest path when the split fits in memory.
- ``stream``: each step reads and decodes only this process's examples of the
  step's global batch (parallel decode, bounded buffers, prefetch); memory and
  start-up do not grow with the dataset.
- ``auto`` (default): ``cache`` when the decoded split is at most
  ``data.cache_max_gb``, else ``stream``.

Both draw each epoch's order from a stateless permutation seeded by (seed,
epoch), take this process's slice of every global batch, and augment each
example with a seed derived from (seed, epoch, example index). Batches therefore
depend only on (seed, step), identically in both modes, which makes resuming at
any step exact and cheap: no iterator state is saved (README "Data at scale").
"""
from __future__ import annotations  # tf in signatures: TensorFlow loads at first use

import atexit
import dataclasses
import functools
import weakref

import numpy as np
from etils import epy

with epy.lazy_imports():  # TensorFlow loads at first use: building or timing a step needs none
  import tensorflow as tf

from faceflax import progress as progress_lib
from faceflax.data import images as images_lib, ops
from faceflax.data.errors import DataError

AUTOTUNE = -1  # tf.data.AUTOTUNE, without loading TensorFlow at import
INPUT_MODES = ('auto', 'cache', 'stream')
_RESERVED_KEYS = ('image', 'image_lq', 'mask', 'rng', '_index', '_epoch')
_READ_CHUNK = 64  # records read per numpy call (one Python call per chunk, not per image)
_PREFETCH = 2     # batches ready ahead of the step when streaming


def validate_images(paths):
  """Raises DataError naming every file that is missing or does not decode.

  tf.data errors cannot name the file. Readers already screened their examples
  (``images.screen``, cached), so this is a cheap last guard; it never skips,
  since dropping rows here would misalign predictions with their labels. A
  store's records were screened when it was prepared.
  """
  if _from_files(paths):
    images_lib.screen(paths, 'input pipeline', skippable=False, colour_set=False)


@dataclasses.dataclass(frozen=True)
class InputOptions:
  """How a task's pipelines read and keep images (``options(config)``)."""
  cache_pp: str = 'decode|resize(64)'
  mode: str = 'auto'
  cache_max_gb: float = 2.0
  image_size: int = 64


def image_size(config) -> int:
  """The side images are resized to on load: ``data.image_size``, else the backbone's."""
  size = config.data.get('image_size')
  return int(size if size is not None else config.backbone.image_size)


def options(config) -> InputOptions:
  """The input options of ``config.data`` (``input``, ``cache_max_gb``; README "Data at scale")."""
  d, size = config.data, image_size(config)
  mode = d.get('input', 'auto')
  if mode not in INPUT_MODES:
    raise ValueError(f'config.data.input={mode!r}: expected one of {INPUT_MODES}')
  cache_max_gb = d.get('cache_max_gb', 2.0)
  if not isinstance(cache_max_gb, (int, float)) or cache_max_gb < 0:
    raise ValueError(f'config.data.cache_max_gb={cache_max_gb!r}: expected a number >= 0')
  return InputOptions(f'decode|resize({size})', mode, float(cache_max_gb), size)


def cache_pp(config) -> str:
  """What every image goes through once, on load: decode and resize to the task's size."""
  return options(config).cache_pp


def spec(config, text: str) -> str:
  """A preprocessing spec of the config with ``{size}`` filled in."""
  return text.replace('{size}', str(image_size(config)))


@dataclasses.dataclass(frozen=True)
class EncodedImages:
  """Encoded image bytes held in memory (an object array), e.g. a verification ``.bin``'s."""
  data: np.ndarray
  name: str = 'memory'

  def __len__(self):
    return len(self.data)

  def read(self, positions) -> list[bytes]:
    return list(np.asarray(self.data, dtype=object)[np.asarray(positions, np.int64)])

  def describe(self, position) -> str:
    return f'{self.name} image {position}'

  def take(self, positions) -> 'EncodedImages':
    return EncodedImages(np.asarray(self.data, dtype=object)[positions], self.name)


@dataclasses.dataclass(frozen=True)
class FileImages:
  """Image files read as bytes by position: a folder's part of a ``ConcatImages``."""
  paths: tuple

  def __len__(self):
    return len(self.paths)

  def read(self, positions) -> list[bytes]:
    out = []
    for p in np.asarray(positions, np.int64).reshape(-1):
      with open(self.paths[p], 'rb') as f:
        out.append(f.read())
    return out

  def describe(self, position) -> str:
    return str(self.paths[position])

  def take(self, positions) -> 'FileImages':
    return FileImages(tuple(np.asarray(self.paths, dtype=object)[positions]))


class ConcatImages:
  """Several image sources (paths, stores' records, bytes) read as one, in order: e.g.
  the datasets of face-prior pretraining when one of them is a record store."""

  def __init__(self, parts):
    self.parts = [p if hasattr(p, 'read') else FileImages(tuple(map(str, p))) for p in parts]
    self.starts = np.cumsum([0] + [len(p) for p in self.parts])

  def __len__(self):
    return int(self.starts[-1])

  def _locate(self, positions):
    positions = np.asarray(positions, np.int64).reshape(-1)
    return positions, np.searchsorted(self.starts, positions, side='right') - 1

  def read(self, positions) -> list[bytes]:
    positions, part_of = self._locate(positions)
    out = [b''] * len(positions)
    for part in np.unique(part_of):
      where = np.flatnonzero(part_of == part)
      for i, data in zip(where, self.parts[part].read(positions[where] - self.starts[part])):
        out[i] = data
    return out

  def describe(self, position) -> str:
    _, (part,) = self._locate([position])
    return self.parts[part].describe(int(position - self.starts[part]))

  def take(self, positions) -> 'ConcatImages':
    positions, part_of = self._locate(positions)
    if np.any(np.diff(part_of) < 0):
      raise ValueError('ConcatImages.take needs positions in order')
    return ConcatImages([self.parts[k].take(positions[part_of == k] - self.starts[k])
                         for k in np.unique(part_of)])


def join_images(parts, drop_repeats=False):
  """One sequence of several image sequences, in order: paths stay paths (read by tf.data;
  with ``drop_repeats`` a path listed twice is kept once), a byte source among them makes
  a ``ConcatImages``."""
  if not any(hasattr(p, 'read') for p in parts):
    paths = [str(path) for part in parts for path in part]
    return tuple(dict.fromkeys(paths) if drop_repeats else paths)
  return ConcatImages(parts)


def _from_files(images) -> bool:
  """Whether ``images`` are paths (read by tf.data) rather than a byte source with ``read``."""
  return not hasattr(images, 'read')


def _label_columns(labels, num_examples):
  columns = {}
  for key, values in labels.items():
    if key in _RESERVED_KEYS:
      raise DataError(f'label name {key!r} is reserved by the pipeline')
    try:
      values = np.asarray(values, np.float32)
    except (TypeError, ValueError) as e:
      raise DataError(f'label {key!r} is not numeric: {e}') from e
    if len(values) != num_examples:
      raise DataError(f'label {key!r} has {len(values)} rows for {num_examples} images')
    columns[key] = values
  return columns


def _local_batch_size(batch_size, process_count):
  if batch_size % process_count:
    raise ValueError(f'batch_size {batch_size} not divisible by {process_count} processes')
  return batch_size // process_count


class _Reader:
  """Reads the examples at given positions: encoded image bytes (or paths) and labels.

  One ``tf.numpy_function`` call per chunk of positions gathers the labels and, from a
  store, the records; files are read by ``tf.io.read_file`` in tf.data's threads.
  """

  def __init__(self, images, labels):
    if not len(images):
      raise DataError('no examples selected')
    self.images = images
    self.num_examples = len(images)
    self.from_files = _from_files(images)
    if self.from_files:
      self.paths = np.asarray([str(p) for p in images])
    self.labels = _label_columns(labels, self.num_examples)

  def _gather(self, positions):
    if self.from_files:  # tf.data reads the files
      image = self.paths[positions]
    else:
      image = np.asarray(self.images.read(positions), dtype=object)
    return [image] + [self.labels[k][positions] for k in self.labels]

  def chunk_fn(self):
    """tf function: positions [k] -> {'image': bytes or paths [k], labels..., '_index'}."""
    keys = list(self.labels)
    shapes = {k: v.shape[1:] for k, v in self.labels.items()}

    def read(positions):
      out = tf.numpy_function(self._gather, [positions],
                              [tf.string] + [tf.float32] * len(keys), stateful=False)
      example = {'image': tf.ensure_shape(out[0], [None]), '_index': positions}
      for k, v in zip(keys, out[1:]):
        example[k] = tf.ensure_shape(v, [None, *shapes[k]])
      return example
    return read

  def describe(self, position) -> str:
    if self.from_files:
      return str(self.paths[position])
    return self.images.describe(position)

  def find_bad(self, positions) -> list[str]:
    """'where: why' of each example at ``positions`` whose image does not decode."""
    bad = []
    for p in positions:
      p = int(p)
      try:
        if self.from_files:
          with open(self.paths[p], 'rb') as f:
            data = f.read()
        else:
          data = self.images.read([p])[0]
        why = images_lib.bytes_problem(data)
      except (OSError, DataError) as e:
        why = str(e)
      if why:
        bad.append(f'{self.describe(p)}: {why}')
    return bad


def _loaded(reader: _Reader, positions: tf.data.Dataset, cache_pp, *, progress=''):
  """Examples at the positions (a dataset of [k] chunks), read and put through ``cache_pp``."""
  preprocess = ops.get_preprocess_fn(cache_pp)
  tick = progress_lib.counter(progress, reader.num_examples) if progress else None

  def load(example):
    example = dict(example)
    if reader.from_files:
      example['image'] = tf.io.read_file(example['image'])
    example = preprocess(example)
    if tick is not None:  # the image depends on the count, so the call is never pruned
      with tf.control_dependencies([tf.py_function(tick, [], tf.int64)]):
        example['image'] = tf.identity(example['image'])
    return example
  return (positions.map(reader.chunk_fn(), num_parallel_calls=AUTOTUNE, deterministic=True)
          .unbatch()
          .map(load, num_parallel_calls=AUTOTUNE, deterministic=True))


def _with_options(dataset):
  options = tf.data.Options()
  options.deterministic = True
  return dataset.with_options(options)


def _cached_bytes(reader, cache_pp) -> int | None:
  """Bytes the decoded split takes in the cache; None when ``cache_pp`` keeps each image's
  own size (unknown before decoding)."""
  spec = _loaded(reader, tf.data.Dataset.from_tensors(tf.zeros([1], tf.int64)),
                 cache_pp).element_spec
  if not spec['image'].shape.is_fully_defined():
    return None
  per_example = sum(s.shape.num_elements() * s.dtype.size for s in spec.values())
  return per_example * reader.num_examples


def choose_mode(reader, opts: InputOptions) -> str:
  """``opts.mode``, or for 'auto' whether the decoded split fits in ``cache_max_gb``."""
  if opts.mode != 'auto':
    return opts.mode
  size = _cached_bytes(reader, opts.cache_pp)
  return 'cache' if size is None or size <= opts.cache_max_gb * 2**30 else 'stream'


class _EpochOrder:
  """This process's positions of each step: a stateless permutation per (seed, epoch)."""

  def __init__(self, num_examples, batch_size, seed, process_index, process_count):
    self.num_examples = num_examples
    self.batch_size = batch_size
    self.local_batch = _local_batch_size(batch_size, process_count)
    self.steps_per_epoch = num_examples // batch_size
    if not self.steps_per_epoch:
      raise DataError(f'{num_examples} examples do not fill one batch of {batch_size}')
    self.process_index, self.process_count = process_index, process_count
    self.shuffle_seed, self.augment_seed = tf.unstack(tf.random.experimental.stateless_split(
        tf.constant([seed, 0], tf.int64), 2))

  def steps(self, epoch):
    """[steps_per_epoch, local_batch] positions of this process in ``epoch``."""
    order = tf.random.experimental.stateless_shuffle(
        tf.range(self.num_examples, dtype=tf.int64),
        tf.random.experimental.stateless_fold_in(self.shuffle_seed, epoch), alg='philox')
    # Global batch s holds order[s * batch_size:][:batch_size]; process p takes
    # its contiguous slice. The tail that fills no batch is skipped this epoch.
    return tf.reshape(order[:self.steps_per_epoch * self.batch_size],
                      [self.steps_per_epoch, self.process_count, self.local_batch]
                      )[:, self.process_index]

  def positions_of_step(self, step) -> np.ndarray:
    epoch, in_epoch = divmod(step, self.steps_per_epoch)
    return self.steps(tf.constant(epoch, tf.int64))[in_epoch].numpy()

  def augment_fn(self, pp):
    preprocess = ops.get_preprocess_fn(pp)
    fold_in = tf.random.experimental.stateless_fold_in

    def augment(example):
      example = dict(example)
      epoch, index = example.pop('_epoch'), example.pop('_index')
      example['rng'] = fold_in(fold_in(self.augment_seed, epoch), index)
      example = preprocess(example)
      example.pop('rng', None)
      return example
    return augment


_OPEN_ITERATORS = weakref.WeakSet()


@atexit.register
def _close_open_iterators():
  """Stops the tf.data iterators still open at exit, while Python can still run their reads.

  An iterator destroyed during interpreter shutdown waits for its in-flight
  ``numpy_function`` reads, which can no longer take the GIL: the process would hang or
  abort ('terminate called without an active exception') instead of exiting.
  """
  for iterator in list(_OPEN_ITERATORS):
    iterator.close()


class _NamedErrors:
  """Iterator of train batches that names the examples when an image fails to decode.

  tf.data's error cannot say which file or record broke; the step is known, so its
  examples are checked one by one and the DataError names them (shard and record).
  """

  def __init__(self, batches, reader: _Reader, order: _EpochOrder, start_step):
    self.batches, self.reader, self.order, self.step = batches, reader, order, start_step
    _OPEN_ITERATORS.add(self)

  def __iter__(self):
    return self

  def close(self):
    self.batches = None  # the tf.data iterator stops here, not at interpreter shutdown

  def __next__(self):
    if self.batches is None:
      raise StopIteration
    try:
      batch = next(self.batches)
    except tf.errors.OpError as e:
      self.close()
      bad = self.reader.find_bad(self.order.positions_of_step(self.step))
      if not bad:
        raise
      raise DataError(f'training step {self.step}: {len(bad)} example(s) do not decode '
                      f'(changed or damaged after screening): ' + '; '.join(bad[:5])) from e
    self.step += 1
    return batch


def make_train_dataset(images, labels, *, batch_size, pp, seed, start_step=0,
                       process_index=0, process_count=1, cache_pp='decode|resize(64)',
                       validate=True, mode='auto', cache_max_gb=2.0):
  """Infinite iterator of this process's share of each global training batch.

  ``images``: file paths or a byte source (``records.RecordImages``, ``ConcatImages``,
  ...); ``labels``: {name: [N, ...]}.
  Each process yields `batch_size // process_count` rows per step; stacking the
  processes' batches in process order gives the single-process global batch.
  ``mode``: 'cache', 'stream' or 'auto' (module docstring).
  """
  ops.keep_tensorflow_off_accelerators()
  reader = _Reader(images, labels)
  order = _EpochOrder(reader.num_examples, batch_size, seed, process_index, process_count)
  mode = choose_mode(reader, InputOptions(cache_pp, mode, cache_max_gb))
  start_epoch, start_in_epoch = divmod(start_step, order.steps_per_epoch)

  def this_epoch(epoch):
    steps = order.steps(epoch)
    return tf.reshape(steps[tf.where(epoch == start_epoch, start_in_epoch, 0):], [-1])

  if mode == 'cache':
    if validate:
      validate_images(images)
    everything = _loaded(
        reader, tf.data.Dataset.range(reader.num_examples).batch(_READ_CHUNK), cache_pp,
        progress=f'caching the training images ({cache_pp})')
    if _cached_bytes(reader, cache_pp) is None:  # one tensor holds them all
      raise ValueError(f'cache_pp {cache_pp!r} must give fixed-size images (end with resize)')
    everything = everything.batch(reader.num_examples).cache()

    def epoch_examples(epoch):
      positions = this_epoch(epoch)

      def gather(data):
        examples = {k: tf.gather(v, positions) for k, v in data.items()}
        examples['_epoch'] = tf.fill(tf.shape(positions), epoch)
        return tf.data.Dataset.from_tensor_slices(examples)
      return everything.flat_map(gather)
  else:
    def epoch_examples(epoch):
      chunks = tf.data.Dataset.from_tensor_slices(this_epoch(epoch)).batch(_READ_CHUNK)
      return _loaded(reader, chunks, cache_pp).map(lambda e: dict(e, _epoch=epoch))

  dataset = (tf.data.Dataset.counter(start_epoch)
             .flat_map(epoch_examples)
             .map(order.augment_fn(pp), num_parallel_calls=AUTOTUNE, deterministic=True)
             .batch(order.local_batch, drop_remainder=True)
             .prefetch(AUTOTUNE if mode == 'cache' else _PREFETCH))
  return _NamedErrors(_with_options(dataset).as_numpy_iterator(), reader, order, start_step)


def train_batches(config, images, labels, *, batch_size, pp, seed):
  """``start_step -> batches`` for a ``loop.Stage``: this process's share of every step.

  ``pp``: the train augmentations (``{size}`` is filled in); every task's stages get
  their input here, so ``data.input`` and ``data.cache_max_gb`` apply to all of them.
  """
  import jax  # pylint: disable=g-import-not-at-top  # the pipeline itself needs no JAX
  opts = options(config)
  return functools.partial(
      make_train_dataset, images, labels, batch_size=batch_size, pp=spec(config, pp),
      seed=seed, cache_pp=opts.cache_pp, mode=opts.mode, cache_max_gb=opts.cache_max_gb,
      process_index=jax.process_index(), process_count=jax.process_count())


class _NumpyBatches:
  """Re-iterable view of a finite tf.data.Dataset as numpy batches.

  With ``progress`` (a name), a pass logs count, rate and ETA over its examples.
  """

  def __init__(self, dataset, num_batches, progress='', num_examples=0, batch_size=1):
    self.dataset = dataset
    self.num_batches = num_batches
    self.progress, self.num_examples, self.batch_size = progress, num_examples, batch_size

  def __iter__(self):
    batches = self.dataset.as_numpy_iterator()
    if not self.progress:
      return batches
    return progress_lib.logged(batches, self.progress, self.num_examples, self.batch_size)

  def __len__(self):
    return self.num_batches


def make_eval_dataset(images, labels, *, batch_size, pp, process_index=0,
                      process_count=1, cache_pp='decode|resize(64)', validate=True,
                      progress='', mode='auto', cache_max_gb=2.0):
  """Every example exactly once, in order, padded to whole batches.

  Each batch has a boolean 'mask' (False on padding rows). Global batch s is
  split across processes like in training, so all processes yield the same
  number of batches. ``progress``: the name of periodic progress lines for a pass
  that takes long (the first one also decodes and resizes every image). With
  ``mode`` 'cache' (or 'auto' and a small split) the decoded images are kept for
  the next pass.
  """
  ops.keep_tensorflow_off_accelerators()
  reader = _Reader(images, labels)
  num_examples = reader.num_examples
  local_batch = _local_batch_size(batch_size, process_count)
  num_batches = -(-num_examples // batch_size)
  if validate:
    validate_images(images)

  positions = np.arange(num_batches * batch_size).reshape(
      num_batches, process_count, local_batch)[:, process_index].ravel()
  mask = positions < num_examples
  rows = np.where(mask, positions, 0)  # Padding repeats row 0, masked out.
  preprocess = ops.get_preprocess_fn(pp)

  def process(example, mask):
    example = dict(example)
    example.pop('_index')
    return dict(preprocess(example), mask=mask)

  loaded = _loaded(reader, tf.data.Dataset.from_tensor_slices(rows).batch(_READ_CHUNK),
                   cache_pp)
  if choose_mode(reader, InputOptions(cache_pp, mode, cache_max_gb)) == 'cache':
    loaded = loaded.cache()
  dataset = (tf.data.Dataset.zip(loaded, tf.data.Dataset.from_tensor_slices(mask))
             .map(process, num_parallel_calls=AUTOTUNE, deterministic=True)
             .batch(local_batch)
             .prefetch(AUTOTUNE))
  return _NumpyBatches(_with_options(dataset), num_batches, progress, num_examples,
                       batch_size)


def head(images, n):
  """The first ``n`` of ``images`` (paths or a byte source), for probe batches."""
  if not _from_files(images):
    return images.take(np.arange(min(n, len(images))))
  return list(images[:n]) if hasattr(images, '__getitem__') else list(images)[:n]
