"""TFDS builder for the official CelebA release (reader: faceflax.data.celeba)."""

import numpy as np
import tensorflow_datasets as tfds

from faceflax.data import celeba
from faceflax.data.tfds import common


class Celeba(common.ReaderBuilder):
  """CelebA: aligned celebrity faces with an identity and 40 binary attributes."""

  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Download from https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html (the authors'
  Google Drive): Img/img_align_celeba.zip (unzip it), Anno/list_attr_celeba.txt,
  Anno/identity_CelebA.txt and Eval/list_eval_partition.txt (identity_CelebA.txt
  is sent on request). `manual_dir` holds them in that layout, or all in one
  folder (a sub-folder named CelebA is used when present). Splits: partition
  0 = train, 1 = val, 2 = test.
  """

  def _info(self):
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            'image': common.jpeg_image(),
            'filename': tfds.features.Text(),
            'identity': tfds.features.Scalar(np.int32),
            'attributes': {name: tfds.features.Scalar(np.bool_) for name in celeba.ATTRIBUTES},
        }),
        homepage='https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html')

  def _split_generators(self, dl_manager):
    root = common.dataset_root(dl_manager, 'CelebA')
    return self._reader_splits(lambda split: celeba.read_celeba(root, split), celeba.SPLITS, root)

  def _generate_examples(self, examples, root):
    for key, example in super()._generate_examples(examples, root):
      attributes = {name: example.pop(name) > 0 for name in celeba.ATTRIBUTES}
      yield key, {**example, 'attributes': attributes}
