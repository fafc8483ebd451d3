"""Pieces shared by the faceflax TFDS builders."""

import os
from pathlib import Path

from absl import logging
import numpy as np
import tensorflow_datasets as tfds

from faceflax.data import age_datasets

VERSION = tfds.core.Version('1.0.0')
RELEASE_NOTES = {'1.0.0': 'First release: the splits of the faceflax readers.'}

GENDERS = ('male', 'female')
RACES = ('white', 'black', 'asian', 'indian', 'others')  # UTKFace's codes 0..4.
AGE_GROUPS = tuple(f'{low}-{high}' for low, high in age_datasets.ADIENCE_GROUPS)


def dataset_root(dl_manager, name) -> Path:
  """`manual_dir/name` if it exists, else `manual_dir` itself.

  The default manual_dir (<data_dir>/downloads/manual) is shared by all datasets,
  so each may sit in its own sub-folder there; `--manual_dir` may also point at
  the dataset folder directly.
  """
  manual_dir = Path(dl_manager.manual_dir)
  return manual_dir / name if (manual_dir / name).is_dir() else manual_dir


def jpeg_image():
  """The downloaded JPEG bytes, stored as they are (no re-encoding)."""
  return tfds.features.Image(shape=(None, None, 3), encoding_format='jpeg')


def age_features(class_labels):
  """The age readers' four labels; those in `class_labels` are always known.

  The others are int32 with -1 = unknown, as the readers return them (a
  ClassLabel cannot hold -1).
  """
  names = {'gender': GENDERS, 'race': RACES, 'age_group': AGE_GROUPS}
  features = {'age': tfds.features.Scalar(np.float32, doc='years (Adience: range midpoint)')}
  for key, values in names.items():
    features[key] = (tfds.features.ClassLabel(names=values) if key in class_labels else
                     tfds.features.Scalar(np.int32, doc=f'{", ".join(values)}; -1 = unknown'))
  return features


class ReaderBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A builder whose splits are the Examples of a faceflax reader."""

  VERSION = VERSION
  RELEASE_NOTES = RELEASE_NOTES

  def _reader_splits(self, read, splits, root):
    """{split: examples} of `read(split)`, which returns Examples or Loaded."""
    generators = {}
    for split in splits:
      examples = read(split)
      if isinstance(examples, age_datasets.Loaded):
        examples, skipped = examples
        if skipped:  # Rows the reader leaves out by design (e.g. Adience ages 'None').
          logging.warning('%s %s: skipped %d entries, e.g. %s', self.name, split,
                          len(skipped), skipped[:3])
      generators[split] = self._generate_examples(examples, root)
    return generators

  def _generate_examples(self, examples, root):
    """(key, example) per reader row; the key is the image path relative to `root`."""
    for i, path in enumerate(examples.paths):
      filename = os.path.relpath(path, root)
      yield filename, {'image': path, 'filename': filename,
                       **{key: values[i] for key, values in examples.labels.items()}}

