"""TFDS builder for UTKFace as downloaded (reader: faceflax.data.age_datasets.read_utkface)."""

import tensorflow_datasets as tfds

from faceflax.data import age_datasets
from faceflax.data.tfds import common


class Utkface(common.ReaderBuilder):
  """UTKFace: faces labelled with age, gender and race by their file names."""

  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Download UTKFace from https://susanqq.github.io/UTKFace/ (e.g. "Aligned&Cropped
  Faces", UTKFace.tar.gz) and unpack it. `manual_dir` is the folder holding the
  images (at any depth; a sub-folder named UTKFace is used when present).
  Images are named [age]_[gender]_[race]_[date&time].jpg.
  """

  def _info(self):
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            'image': common.jpeg_image(),
            'filename': tfds.features.Text(),
            **common.age_features(class_labels=('gender', 'race')),
        }),
        supervised_keys=('image', 'age'),
        homepage='https://susanqq.github.io/UTKFace/')

  def _split_generators(self, dl_manager):
    root = common.dataset_root(dl_manager, 'UTKFace')
    # A few released names lack the race field: skipped and logged, not fatal.
    return self._reader_splits(
        lambda split: age_datasets.read_utkface(root, split, skip_malformed=True),
        ('train', 'val'), root)
