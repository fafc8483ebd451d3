"""TFDS builder for MORPH II (reader: faceflax.data.age_datasets.read_morph)."""

import tensorflow_datasets as tfds

from faceflax.data import age_datasets
from faceflax.data.tfds import common


class Morph2(common.ReaderBuilder):
  """MORPH II: mugshots with age, gender and race, from the distributed CSV list."""

  BUILDER_CONFIGS = [
      tfds.core.BuilderConfig(name=protocol, description=(
          '80/20 train/test split by subject (hash of the subject id)'))
      for protocol in age_datasets.MORPH_PROTOCOLS]
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  MORPH II is licensed by the University of North Carolina Wilmington (UNCW),
  which sends the images and their list on request.
  `manual_dir` holds its one CSV list (e.g. morph_2008_nonCommercial.csv, with
  columns such as id_num, photo, age, gender, race) and the images at the paths
  the list gives, relative to `manual_dir` (a sub-folder named MORPH is used
  when present).
  """

  def _info(self):
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            'image': common.jpeg_image(),
            'filename': tfds.features.Text(),
            # Gender and race stay int32: the reader gives -1 when a column is absent.
            **common.age_features(class_labels=()),
        }),
        supervised_keys=('image', 'age'))

  def _split_generators(self, dl_manager):
    root = common.dataset_root(dl_manager, 'MORPH')
    protocol = self.builder_config.name
    return self._reader_splits(
        lambda split: age_datasets.read_morph(root, split, protocol), ('train', 'test'), root)
