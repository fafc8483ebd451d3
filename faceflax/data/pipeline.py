"""Deterministic, resumable tf.data input pipelines that yield numpy batches.

Train: the whole split is decoded and resized once (`cache_pp`) into a single
in-memory element; every epoch then gathers it in a stateless permutation
seeded by (seed, epoch) and augments each example with a seed derived from
(seed, epoch, example index). Batches therefore depend only on (seed, step),
which makes resuming at any step exact and cheap.
"""

import numpy as np
import tensorflow as tf

from faceflax import progress as progress_lib
from faceflax.data import images, ops  # ops also hides GPUs from TensorFlow.
from faceflax.data.errors import DataError

AUTOTUNE = tf.data.AUTOTUNE
_RESERVED_KEYS = ('image', 'image_lq', 'mask', 'rng', '_index', '_epoch')


def validate_images(paths):
  """Raises DataError naming every file that is missing or does not decode.

  tf.data errors cannot name the file. Readers already screened their examples
  (``images.screen``, cached), so this is a cheap last guard; it never skips,
  since dropping rows here would misalign predictions with their labels.
  """
  images.screen(paths, 'input pipeline', skippable=False, colour_set=False)


def _columns(paths, labels):
  """Numpy columns: 'image' holds the paths, labels become float32."""
  if not len(paths):
    raise DataError('no examples selected')
  columns = {'image': np.asarray([str(p) for p in paths])}
  for key, values in labels.items():
    if key in _RESERVED_KEYS:
      raise DataError(f'label name {key!r} is reserved by the pipeline')
    try:
      values = np.asarray(values, np.float32)
    except (TypeError, ValueError) as e:
      raise DataError(f'label {key!r} is not numeric: {e}') from e
    if len(values) != len(paths):
      raise DataError(f'label {key!r} has {len(values)} rows for {len(paths)} paths')
    columns[key] = values
  return columns


def _local_batch_size(batch_size, process_count):
  if batch_size % process_count:
    raise ValueError(f'batch_size {batch_size} not divisible by {process_count} processes')
  return batch_size // process_count


def _loaded(columns, cache_pp, progress=''):
  """Dataset of examples with file bytes read and `cache_pp` applied.

  ``progress``: the name of progress lines as examples load (a long first step when a
  large split is decoded and resized into the cache).
  """
  preprocess = ops.get_preprocess_fn(cache_pp)
  tick = progress_lib.counter(progress, len(columns['image'])) if progress else None

  def load(example):
    example = preprocess(dict(example, image=tf.io.read_file(example['image'])))
    if tick is not None:  # the image depends on the count, so the call is never pruned
      with tf.control_dependencies([tf.py_function(tick, [], tf.int64)]):
        example['image'] = tf.identity(example['image'])
    return example
  return tf.data.Dataset.from_tensor_slices(columns).map(
      load, num_parallel_calls=AUTOTUNE, deterministic=True)


def _with_options(dataset):
  options = tf.data.Options()
  options.deterministic = True
  return dataset.with_options(options)


def make_train_dataset(paths, labels, *, batch_size, pp, seed, start_step=0,
                       process_index=0, process_count=1,
                       cache_pp='decode|resize(64)', validate=True):
  """Infinite iterator of this process's share of each global training batch.

  Each process yields `batch_size // process_count` rows per step; stacking the
  processes' batches in process order gives the single-process global batch.
  """
  columns = _columns(paths, labels)
  num_examples = len(paths)
  local_batch = _local_batch_size(batch_size, process_count)
  steps_per_epoch = num_examples // batch_size
  if not steps_per_epoch:
    raise DataError(f'{num_examples} examples do not fill one batch of {batch_size}')
  if validate:
    validate_images(paths)

  columns['_index'] = np.arange(num_examples)
  everything = _loaded(columns, cache_pp, f'caching the training images ({cache_pp})')
  everything = everything.batch(num_examples)
  if not everything.element_spec['image'].shape[1:].is_fully_defined():
    raise ValueError(f'cache_pp {cache_pp!r} must give fixed-size images (end with resize)')
  everything = everything.cache()

  shuffle_seed, augment_seed = tf.unstack(tf.random.experimental.stateless_split(
      tf.constant([seed, 0], tf.int64), 2))
  fold_in = tf.random.experimental.stateless_fold_in
  start_epoch, start_in_epoch = divmod(start_step, steps_per_epoch)

  def epoch_examples(epoch):
    order = tf.random.experimental.stateless_shuffle(
        tf.range(num_examples), fold_in(shuffle_seed, epoch), alg='philox')
    # Global batch s holds order[s * batch_size:][:batch_size]; process p takes
    # its contiguous slice. The tail that fills no batch is skipped this epoch.
    order = tf.reshape(order[:steps_per_epoch * batch_size],
                       [steps_per_epoch, process_count, local_batch])[:, process_index]
    order = tf.reshape(order[tf.where(epoch == start_epoch, start_in_epoch, 0):], [-1])

    def gather(data):
      examples = {k: tf.gather(v, order) for k, v in data.items()}
      examples['_epoch'] = tf.fill(tf.shape(order), epoch)
      return tf.data.Dataset.from_tensor_slices(examples)
    return everything.flat_map(gather)

  preprocess = ops.get_preprocess_fn(pp)

  def augment(example):
    example = dict(example)
    epoch, index = example.pop('_epoch'), example.pop('_index')
    example['rng'] = fold_in(fold_in(augment_seed, epoch), index)
    example = preprocess(example)
    example.pop('rng', None)
    return example

  dataset = (tf.data.Dataset.counter(start_epoch)
             .flat_map(epoch_examples)
             .map(augment, num_parallel_calls=AUTOTUNE, deterministic=True)
             .batch(local_batch, drop_remainder=True)
             .prefetch(AUTOTUNE))
  return _with_options(dataset).as_numpy_iterator()


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


def make_eval_dataset(paths, labels, *, batch_size, pp, process_index=0,
                      process_count=1, cache_pp='decode|resize(64)', validate=True,
                      progress=''):
  """Every example exactly once, in order, padded to whole batches.

  Each batch has a boolean 'mask' (False on padding rows). Global batch s is
  split across processes like in training, so all processes yield the same
  number of batches. ``progress``: the name of periodic progress lines for a pass
  that takes long (the first one also decodes and resizes every image).
  """
  columns = _columns(paths, labels)
  num_examples = len(paths)
  local_batch = _local_batch_size(batch_size, process_count)
  num_batches = -(-num_examples // batch_size)
  if validate:
    validate_images(paths)

  positions = np.arange(num_batches * batch_size).reshape(
      num_batches, process_count, local_batch)[:, process_index].ravel()
  mask = positions < num_examples
  rows = np.where(mask, positions, 0)  # Padding repeats row 0, masked out.
  columns = {k: v[rows] for k, v in columns.items()}
  preprocess = ops.get_preprocess_fn(pp)

  def process(example):
    example = dict(example)
    mask = example.pop('mask')
    return dict(preprocess(example), mask=mask)

  columns['mask'] = mask
  dataset = (_loaded(columns, cache_pp).cache()
             .map(process, num_parallel_calls=AUTOTUNE, deterministic=True)
             .batch(local_batch)
             .prefetch(AUTOTUNE))
  return _NumpyBatches(_with_options(dataset), num_batches, progress, num_examples,
                       batch_size)
