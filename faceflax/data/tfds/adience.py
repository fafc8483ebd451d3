"""TFDS builder for Adience (reader: faceflax.data.age_datasets.read_adience)."""

import tensorflow_datasets as tfds

from faceflax.data import age_datasets
from faceflax.data.tfds import common


class Adience(common.ReaderBuilder):
  """Adience: faces with one of 8 age groups and gender; 5 subject-exclusive folds."""

  BUILDER_CONFIGS = [
      tfds.core.BuilderConfig(name=protocol, description=(
          f'test on fold {protocol[-1]}, train on the other four'))
      for protocol in age_datasets.ADIENCE_PROTOCOLS]
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Download Adience from https://talhassner.github.io/home/projects/Adience/Adience-data.html
  (faces.tar.gz and fold_0_data.txt .. fold_4_data.txt). `manual_dir` holds the
  fold files and faces/<user_id>/coarse_tilt_aligned_face.*.jpg (a sub-folder
  named adience is used when present). Rows whose age is 'None' or fits no
  group are left out, as the reader does.
  """

  def _info(self):
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            'image': common.jpeg_image(),
            'filename': tfds.features.Text(),
            **common.age_features(class_labels=('age_group',)),
        }),
        supervised_keys=('image', 'age_group'),
        homepage='https://talhassner.github.io/home/projects/Adience/Adience-data.html')

  def _split_generators(self, dl_manager):
    root = common.dataset_root(dl_manager, 'adience')
    protocol = self.builder_config.name
    return self._reader_splits(
        lambda split: age_datasets.read_adience(root, split, protocol), ('train', 'test'), root)
