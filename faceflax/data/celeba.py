"""Reader for the official CelebA release: aligned images plus its annotation text files.

Layout as on the authors' download page (the text files may also sit next to the images
folder, in `root` itself):
  Img/img_align_celeba/*.jpg
  Anno/list_attr_celeba.txt     line 1: image count; line 2: the 40 attribute names;
                                then "<image> <40 values, 1 or -1>"
  Anno/identity_CelebA.txt      "<image> <identity>"
  Eval/list_eval_partition.txt  "<image> <0 = train, 1 = val, 2 = test>"
Malformed lines raise DataError naming the file and line; nothing is guessed.
"""

from pathlib import Path

import numpy as np

from faceflax.data.errors import DataError
from faceflax.data.folder import Examples, check_relative, read_text, screen_files

SPLITS = ('train', 'val', 'test')  # Partition codes 0, 1, 2.
# Line 2 of list_attr_celeba.txt: fixed, so that label names are known before reading.
ATTRIBUTES = (
    '5_o_Clock_Shadow', 'Arched_Eyebrows', 'Attractive', 'Bags_Under_Eyes', 'Bald', 'Bangs',
    'Big_Lips', 'Big_Nose', 'Black_Hair', 'Blond_Hair', 'Blurry', 'Brown_Hair',
    'Bushy_Eyebrows', 'Chubby', 'Double_Chin', 'Eyeglasses', 'Goatee', 'Gray_Hair',
    'Heavy_Makeup', 'High_Cheekbones', 'Male', 'Mouth_Slightly_Open', 'Mustache',
    'Narrow_Eyes', 'No_Beard', 'Oval_Face', 'Pale_Skin', 'Pointy_Nose', 'Receding_Hairline',
    'Rosy_Cheeks', 'Sideburns', 'Smiling', 'Straight_Hair', 'Wavy_Hair', 'Wearing_Earrings',
    'Wearing_Hat', 'Wearing_Lipstick', 'Wearing_Necklace', 'Wearing_Necktie', 'Young')
_SUBDIRS = ('Anno', 'Eval', 'Img')


def _find(root, name):
  for path in (root / name, *(root / d / name for d in _SUBDIRS)):
    if path.exists():
      return path
  raise DataError(f'{root}: no {name} (looked in the folder itself and in {_SUBDIRS})')


def _read_table(path, num_values, skip_lines=0):
  """{image: (where, [values as str])} of a "<image> <values>" list, in file order."""
  table = {}
  lines = read_text(path).splitlines()
  for line_number, line in enumerate(lines[skip_lines:], skip_lines + 1):
    fields = line.split()
    if not fields:
      continue
    where = f'{path}: line {line_number}'
    if len(fields) != num_values + 1:
      raise DataError(f'{where}: expected an image name and {num_values} value(s), '
                      f'got {len(fields)} field(s)')
    check_relative(fields[0], where)
    if fields[0] in table:
      raise DataError(f'{where}: {fields[0]} is listed twice')
    table[fields[0]] = (where, fields[1:])
  return table


def _attribute_names(path):
  lines = read_text(path).splitlines()
  names = tuple(lines[1].split()) if len(lines) > 1 else ()
  if names != ATTRIBUTES:
    raise DataError(f'{path}: line 2: expected the {len(ATTRIBUTES)} CelebA attribute names '
                    f'{ATTRIBUTES[:2]}..., got {len(names)}: {names[:2]}...')
  return names


def _integers(where, values, valid, column):
  for value in values:
    if value.lstrip('-').isdigit() and int(value) in valid:
      continue
    raise DataError(f'{where}: {column} {value!r} is not one of {list(valid)}')
  return [int(v) for v in values]


def read_celeba(root, split=None, *, check_files=True) -> Examples:
  """Reads `split` ('train', 'val', 'test'; None = all) in list_eval_partition.txt order.

  Labels: 'identity' (int32, 1..10177 in the release), then one int32 column per
  attribute (1 or -1), named as in list_attr_celeba.txt ('5_o_Clock_Shadow', ...).
  """
  root = Path(root).expanduser().absolute()
  if split is not None and split not in SPLITS:
    raise DataError(f'unknown CelebA split {split!r}; valid: {SPLITS} or None (all)')
  images_dir = _find(root, 'img_align_celeba')
  attr_path = _find(root, 'list_attr_celeba.txt')
  names = _attribute_names(attr_path)
  partition_path = _find(root, 'list_eval_partition.txt')
  partition = _read_table(partition_path, 1)
  identities = _read_table(_find(root, 'identity_CelebA.txt'), 1)
  attributes = _read_table(attr_path, len(ATTRIBUTES), skip_lines=2)
  paths, labels = [], {'identity': [], **{name: [] for name in names}}
  for image, (where, (code,)) in partition.items():
    code, = _integers(where, [code], range(len(SPLITS)), 'partition')
    if split is not None and SPLITS[code] != split:
      continue
    for table, path in ((identities, 'identity_CelebA.txt'), (attributes, attr_path.name)):
      if image not in table:
        raise DataError(f'{where}: {image} is not in {path}')
    where, (identity,) = identities[image]
    if not identity.isdigit():
      raise DataError(f'{where}: identity {identity!r} is not a whole number')
    where, values = attributes[image]
    values = _integers(where, values, (-1, 1), 'attribute value')
    paths.append(str(images_dir / image))
    for key, value in zip(labels, [int(identity), *values]):
      labels[key].append(value)
  if not paths:
    raise DataError(f'{partition_path}: no images in split {split!r}')
  examples = Examples('celeba', tuple(paths),
                      {k: np.asarray(v, np.int32) for k, v in labels.items()})
  return screen_files(examples, partition_path) if check_files else examples
