"""Shared by the --mode=predict / eval / verify tests: photos, statuses, CSV rows, tiny datasets."""
import csv

import numpy as np
import pytest
from PIL import Image

from faceflax import predict
from faceflax.data import synthetic
from tests.conftest import SHARED_DATA, shared_dataset

REAL_FACES = (SHARED_DATA / 'celeba_id' / 'labels.csv').exists()
# The Haar detector finds no drawn face: without ../shared/data, the tests that check
# per-file statuses and outputs score the photos unaligned instead of skipping.
ALIGN = 'auto' if REAL_FACES else 'none'


def real_chips(dataset: str, n: int) -> list:
  """The first ``n`` chips of a shared dataset (skips the test when the data is absent)."""
  path = shared_dataset(dataset)
  with open(path / 'labels.csv') as f:
    names = [row['filename'] for row in csv.DictReader(f)][:n]
  return [Image.open(path / 'images' / name).convert('RGB') for name in names]


def face(size: int = 250) -> Image.Image:
  """A real face chip upscaled like a photo; a drawn face when ../shared/data is absent."""
  if REAL_FACES:
    return real_chips('celeba_id', 1)[0].resize((size, size), Image.BICUBIC)
  drawn, _ = synthetic.make_faces(1, size=64, seed=0)
  return Image.fromarray(drawn[0]).resize((size, size), Image.BICUBIC)


def csv_rows(path) -> dict:
  with open(path) as f:
    return {row['file']: row for row in csv.DictReader(f)}


def assert_same_predictions(a: dict, b: dict):
  """Two --mode=predict results (CSV rows and .npy arrays) agree to 1e-6."""
  rows_a, rows_b = csv_rows(a['output']), csv_rows(b['output'])
  assert rows_a.keys() == rows_b.keys()
  for name, row in rows_a.items():
    assert row.keys() == rows_b[name].keys()
    for column, value in row.items():
      try:
        np.testing.assert_allclose(float(value), float(rows_b[name][column]), rtol=1e-6,
                                   atol=1e-6, err_msg=f'{name} {column}')
      except ValueError:  # not a number: status, class name, note, empty cell
        assert value == rows_b[name][column], (name, column)
  assert a['arrays'].keys() == b['arrays'].keys()
  for name, path in a['arrays'].items():
    np.testing.assert_allclose(np.load(path), np.load(b['arrays'][name]), rtol=1e-6, atol=1e-6)


def needs_detection():
  if not REAL_FACES:
    pytest.skip('face detection is tested on real faces; ../shared/data is not available')


def check_statuses(rows: dict, score_columns):
  """Every input file is a row: the face scored, the others reported with an empty score."""
  assert set(rows) == {'face.jpg', 'gradient.png', 'two.jpg', 'corrupt.jpg'}
  assert rows['corrupt.jpg']['status'] == 'corrupt' and rows['corrupt.jpg']['note']
  if REAL_FACES:
    assert (rows['face.jpg']['status'], rows['face.jpg']['faces']) == ('ok', '1')
    assert (rows['two.jpg']['status'], rows['two.jpg']['faces']) == ('several_faces', '2')
    assert (rows['gradient.png']['status'], rows['gradient.png']['faces']) == ('no_face', '0')
  for name, row in rows.items():
    scored = row['status'] in predict.SCORED
    for column in score_columns:
      assert (row[column] != '') == scored, (name, column)


def folder_dataset(root, header, label_fn, n_train=32, n_val=16):
  (root / 'images').mkdir(parents=True)
  drawn, traits = synthetic.make_faces(n_train + n_val, size=32, seed=0)
  rows = []
  for i, image in enumerate(drawn):
    Image.fromarray(image).save(root / 'images' / f'{i:03d}.png')
    rows.append((f'{i:03d}.png', *label_fn(i, {k: v[i] for k, v in traits.items()}),
                 'train' if i < n_train else 'val'))
  with open(root / 'labels.csv', 'w', newline='') as f:
    csv.writer(f).writerows([('filename', *header, 'split'), *rows])
  return root


def write_photos(root):
  """face.jpg, gradient.png (no face), two.jpg (two faces), corrupt.jpg, notes.txt (not an image)."""
  face().save(root / 'face.jpg', quality=95)
  ramp = np.linspace(0, 255, 240)
  Image.fromarray(np.stack([np.tile(ramp, (180, 1))] * 3, -1).astype(np.uint8)).save(
      root / 'gradient.png')
  canvas = Image.new('RGB', (520, 300), (120, 120, 120))
  canvas.paste(face(230), (15, 35))
  canvas.paste(face(230).transpose(Image.FLIP_LEFT_RIGHT), (275, 35))
  canvas.save(root / 'two.jpg', quality=95)
  (root / 'corrupt.jpg').write_bytes(b'\xff\xd8\xff\xe0' + b'not a jpeg' * 20)
  (root / 'notes.txt').write_text('not an image')
  return root
