"""TFDS builder for the official SCUT-FBP5500_v2 download (reader: faceflax.data.scut_fbp5500)."""

import numpy as np
import tensorflow_datasets as tfds

from faceflax.data import scut_fbp5500
from faceflax.data.tfds import common


class ScutFbp5500(common.ReaderBuilder):
  """SCUT-FBP5500: 5500 faces, each with its mean beauty score (1..5) over 60 raters."""

  BUILDER_CONFIGS = [
      tfds.core.BuilderConfig(name=protocol, description=(
          'the official 60% train / 40% test split' if protocol == '60_40' else
          f'5-fold cross-validation, fold {protocol[2:]}'))
      for protocol in scut_fbp5500.PROTOCOLS]
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Download SCUT-FBP5500_v2 from the authors' release page
  (https://github.com/HCIILAB/SCUT-FBP5500-Database-Release) and unpack it.
  `manual_dir` is the unpacked SCUT-FBP5500_v2 folder (holding Images/ and
  train_test_files/), or a folder containing it.
  """

  def _info(self):
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            'image': common.jpeg_image(),
            'filename': tfds.features.Text(),
            'score': tfds.features.Scalar(np.float32, doc='mean beauty score, 1..5'),
        }),
        supervised_keys=('image', 'score'),
        homepage='https://github.com/HCIILAB/SCUT-FBP5500-Database-Release')

  def _split_generators(self, dl_manager):
    root = common.dataset_root(dl_manager, 'SCUT-FBP5500_v2')
    protocol = self.builder_config.name
    return self._reader_splits(
        lambda split: scut_fbp5500.read_official(root, split, protocol), scut_fbp5500.SPLITS, root)
