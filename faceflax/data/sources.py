"""Entry points that find the right reader for a data directory."""

import os
from pathlib import Path

from absl import logging

from faceflax.data import scut_fbp5500
from faceflax.data.errors import DataError
from faceflax.data.folder import Examples, read_folder

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp')


def _existing_dir(data_dir):
  path = Path(data_dir).expanduser().absolute()
  if not path.is_dir():
    raise DataError(f'no such directory: {path}')
  return path


def load_examples(data_dir, split, *, label_columns=(), protocol='60_40') -> Examples:
  """Reads `split` of an official SCUT-FBP5500 download or a folder-format dataset."""
  root = _existing_dir(data_dir)
  if scut_fbp5500.is_official_layout(root):
    unknown = set(label_columns) - {'score'}
    if unknown:
      raise DataError(f'{root}: the official SCUT-FBP5500 lists only have "score", '
                      f'not {sorted(unknown)}')
    return scut_fbp5500.read_official(root, split, protocol)
  if protocol != '60_40':
    logging.warning('protocol=%r ignored: %s is in folder format.', protocol, root)
  return read_folder(root, split, label_columns=label_columns)


def _is_folder_format(root):
  return (root / 'images').is_dir() and (root / 'labels.csv').is_file()


def _images_under(root):
  found = []
  for folder, _, files in os.walk(root, followlinks=True):
    found += [os.path.join(folder, f) for f in files
              if f.lower().endswith(IMAGE_EXTENSIONS)]
  return sorted(found)


def list_unlabeled_images(dirs) -> tuple[str, ...]:
  """Image paths for unlabeled pretraining, sorted per directory for determinism.

  A folder-format dataset contributes its train rows only (all rows if it has no
  split column), so val/test faces never leak into pretraining. Any other
  directory contributes every image file below it.
  """
  if isinstance(dirs, (str, os.PathLike)):
    dirs = [dirs]
  paths = []
  for data_dir in dirs:
    root = _existing_dir(data_dir)
    if _is_folder_format(root):
      examples = read_folder(root)
      if 'split' in examples.labels:
        examples = examples.select(examples.labels['split'] == 'train')
      found = list(examples.paths)
    else:
      found = _images_under(root)
    if not found:
      raise DataError(f'{root}: no images found')
    paths += found
  return tuple(dict.fromkeys(paths))  # Drops duplicates, keeps order.
