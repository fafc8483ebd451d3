"""TFDS builder for FER2013's fer2013.csv (reader: faceflax.data.fer2013)."""

import numpy as np
import tensorflow_datasets as tfds

from faceflax.data import fer2013
from faceflax.data.tfds import common


class Fer2013(tfds.core.GeneratorBasedBuilder):
  """FER2013: 48x48 greyscale faces, 7 emotions (ICML 2013 challenge)."""

  VERSION = common.VERSION
  RELEASE_NOTES = common.RELEASE_NOTES
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Download fer2013.tar.gz of the Kaggle challenge "Challenges in Representation
  Learning: Facial Expression Recognition Challenge" and unpack it. `manual_dir`
  holds fer2013.csv (directly or in a sub-folder named fer2013). Splits: train =
  Training, val = PublicTest, test = PrivateTest.
  """

  def _info(self):
    size = fer2013.SIZE
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            # The csv holds raw pixels: PNG keeps them exact.
            'image': tfds.features.Image(shape=(size, size, 1), encoding_format='png'),
            'emotion': tfds.features.ClassLabel(names=fer2013.EMOTIONS),
            'line': tfds.features.Scalar(np.int32, doc='line of fer2013.csv'),
        }),
        supervised_keys=('image', 'emotion'),
        homepage=('https://www.kaggle.com/c/'
                  'challenges-in-representation-learning-facial-expression-recognition-challenge'))

  def _split_generators(self, dl_manager):
    path = common.dataset_root(dl_manager, 'fer2013') / 'fer2013.csv'
    return {split: self._generate_examples(path, split) for split in fer2013.SPLITS}

  def _generate_examples(self, path, split):
    for row in fer2013.read_fer2013(path, split):
      yield row.line, {'image': row.image, 'emotion': row.emotion, 'line': row.line}
