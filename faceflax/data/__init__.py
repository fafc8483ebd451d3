"""Face datasets: readers for on-disk formats and tf.data input pipelines."""

from faceflax.data import face_regions  # Registers the 'face_regions' op.
from faceflax.data.errors import DataError
from faceflax.data.folder import Examples, in_split, read_folder
from faceflax.data.ops import get_preprocess_fn, register
from faceflax.data.pipeline import make_eval_dataset, make_train_dataset, validate_images
from faceflax.data.scut_fbp5500 import is_official_layout, read_official
from faceflax.data.sources import list_unlabeled_images, load_examples

__all__ = [
    'DataError', 'Examples', 'in_split', 'read_folder', 'get_preprocess_fn', 'register',
    'make_eval_dataset', 'make_train_dataset', 'validate_images',
    'is_official_layout', 'read_official', 'list_unlabeled_images', 'load_examples',
]
