"""Tests for face-structure targets: shapes, region maps and patch labels."""

import numpy as np
from PIL import Image
import pytest

from faceflax import data
from faceflax.data import DataError
from faceflax.data import face_regions as fr
from tests.conftest import shared_dataset

R = len(fr.REGIONS)
SKIN, BROWS, EYES, NOSE, MOUTH = (fr.REGIONS.index(r) for r in (
    'skin', 'brows', 'eyes', 'nose', 'mouth'))
# Hand-made shapes: a face, tilted parts and one ellipse crossing the border.
SHAPES = np.array([
    [SKIN, 0.5, 0.55, 0.35, 0.45, 0.1],
    [BROWS, 0.3, 0.3, 0.12, 0.04, 0.3],
    [EYES, 0.3, 0.35, 0.08, 0.05, -0.2],
    [EYES, 0.95, 0.4, 0.1, 0.05, 0.0],
    [NOSE, 0.5, 0.55, 0.07, 0.15, 0.0],
    [MOUTH, 0.5, 0.8, 0.2, 0.06, -0.7],
], np.float32)


def _run(spec, features):
  out = data.get_preprocess_fn(spec)(features)
  return {k: v.numpy() for k, v in out.items()}


def _circle(region, r, cx=0.5, cy=0.5):
  return np.array([[region, cx, cy, r, r, 0.0]], np.float32)


# Rasterisers.

@pytest.mark.parametrize('height,width', [(16, 16), (37, 37), (20, 12)])
def test_tf_op_matches_numpy(height, width):
  image = np.zeros((height, width, 3), np.uint8)
  out = _run('face_regions', {'image': image, 'face_shapes': SHAPES})
  expected = fr.region_map_np(SHAPES, (height, width))
  np.testing.assert_array_equal(out['regions'], expected)
  assert out['regions'].dtype == np.float32
  np.testing.assert_array_equal(expected.sum(-1), 1)  # Hard one-hot.
  assert expected[..., 1:].any((0, 1)).all()  # Every region appears.


def test_circle_area_and_pixel_centres():
  size, r = 64, 0.3
  regions = fr.region_map_np(_circle(MOUTH, r), size)
  assert abs(regions[..., MOUTH].sum() / (np.pi * (r * size) ** 2) - 1) < 0.02
  # Pixel i's centre is (i + 0.5) / 16: column 12 is at 0.78125, 0.28125 from
  # the centre, inside r = 0.3; column 13 is 0.34375 away, outside.
  small = fr.region_map_np(_circle(MOUTH, r), 16)
  assert small[7, 12, MOUTH] == 1 and small[7, 13, MOUTH] == 0
  assert small[7, 13, 0] == 1 and small[0, 0, 0] == 1


def test_contour_band_inside_outline():
  regions = fr.region_map_np(_circle(SKIN, 0.4), 20, contour_width=0.1)
  # Row 9 lies at y = 0.475, so its pixels are hypot(x - 0.5, 0.025) from the centre.
  distance = np.hypot((np.arange(20) + 0.5) / 20 - 0.5, 0.025)
  expected = np.where(distance <= 0.3, SKIN, np.where(distance <= 0.4, fr.CONTOUR, 0))
  np.testing.assert_array_equal(regions[9].argmax(-1), expected)
  assert set(expected) == {0, SKIN, fr.CONTOUR}


def test_priority_not_row_order():
  shapes = np.concatenate([_circle(MOUTH, 0.1), _circle(EYES, 0.2), _circle(SKIN, 0.45)])
  labels = fr.region_map_np(shapes, 32).argmax(-1)
  assert labels[16, 16] == MOUTH  # Drawn first, still on top.
  assert labels[16, 21] == EYES  # 0.17 from the centre: eyes over skin.
  assert labels[16, 27] == SKIN and labels[0, 0] == 0


def test_bad_region_id():
  with pytest.raises(ValueError, match='region ids'):
    fr.region_map_np(_circle(R, 0.2), 8)


# Patch labels.

def test_patch_fractions_and_membership():
  labels = np.array([[0, 0, 1, 1],
                     [0, 6, 1, 3],
                     [4, 4, 5, 5],
                     [4, 2, 5, 5]])
  regions = np.eye(R, dtype=np.float32)[labels][None]
  fractions = np.asarray(fr.patch_fractions(regions, 2))
  expected = np.zeros((1, 4, R), np.float32)
  expected[0, 0, [0, 6]] = 0.75, 0.25
  expected[0, 1, [1, 3]] = 0.75, 0.25
  expected[0, 2, [4, 2]] = 0.75, 0.25
  expected[0, 3, 5] = 1.0
  np.testing.assert_allclose(fractions, expected)
  member = np.asarray(fr.component_membership(fractions))
  assert member.shape == (1, 4, len(fr.COMPONENTS)) and member.dtype == bool
  c = {name: i for i, name in enumerate(fr.COMPONENTS)}
  np.testing.assert_array_equal(np.argwhere(member[0]), [
      [0, c['mouth']], [1, c['brows']], [2, c['contour']], [2, c['eyes']], [3, c['nose']]])
  assert not np.asarray(fr.component_membership(fractions, threshold=0.3))[0, 0].any()


# Augmentation keeps the map aligned with the image.

def _one_hot_image(size=24):
  """An image whose channels are the region map itself, so both can be compared."""
  return fr.region_map_np(SHAPES, size)


@pytest.mark.parametrize('seed', range(4))
def test_geometric_ops_move_regions_like_image(seed):
  features = {'image': _one_hot_image(), 'face_shapes': SHAPES, 'rng': np.array([seed, 1])}
  out = _run('face_regions|random_resized_crop(12, scale=(0.3, 0.5))|flip_lr|resize(8)',
             features)
  np.testing.assert_allclose(out['regions'], out['image'], atol=1e-6)
  assert out['regions'].shape == (8, 8, R)
  np.testing.assert_allclose(out['regions'].sum(-1), 1, atol=1e-5)  # Soft fractions.
  uncropped = _run('face_regions|resize(8)', features)['regions']
  assert not np.allclose(out['regions'], uncropped, atol=1e-3)


def test_flip_mirrors_regions():
  image = _one_hot_image()
  flips = []
  for seed in range(6):
    out = _run('face_regions|flip_lr', {'image': image, 'face_shapes': SHAPES,
                                        'rng': np.array([seed, 0])})
    flipped = not np.array_equal(out['image'], image)
    np.testing.assert_array_equal(out['regions'], image[:, ::-1] if flipped else image)
    flips.append(flipped)
  assert any(flips) and not all(flips)


def test_photometric_ops_leave_regions():
  image = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
  out = _run('face_regions|color_jitter(0.4, 0.4, 0.4)|degrade(resolution=4)|value_range(-1, 1)',
             {'image': image, 'face_shapes': SHAPES, 'rng': np.array([0, 3])})
  np.testing.assert_array_equal(out['regions'], fr.region_map_np(SHAPES, 16))
  assert out['image'].dtype == np.float32 and out['image'].min() < 0


# Shapes.

def _check_layout(shapes):
  np.testing.assert_array_equal(shapes[..., 0], np.broadcast_to(fr.SHAPE_REGIONS,
                                                                shapes.shape[:-1]))
  assert fr.is_plausible(shapes).all()


@pytest.mark.parametrize('name', sorted(fr.CHIP_TEMPLATES))
def test_template_shapes(name):
  shapes = fr.shapes_from_template(fr.CHIP_TEMPLATES[name])
  assert shapes.shape == (fr.NUM_SHAPES, 6) and shapes.dtype == np.float32
  _check_layout(shapes)
  _, cx, cy, ax, ay, _ = shapes.T
  reach = np.maximum(ax, ay)  # A bound on the ellipse's extent in any direction.
  parts = slice(1, None)  # The face outline may leave the chip: chips cut the chin.
  assert (cx[parts] - reach[parts] > 0).all() and (cx[parts] + reach[parts] < 1).all()
  assert (cy[parts] - reach[parts] > 0).all() and (cy[parts] + reach[parts] < 1).all()
  assert 0 < cx[0] < 1 and 0 < cy[0] < 1
  left, right = fr.SHAPES.index('left_eye'), fr.SHAPES.index('right_eye')
  assert abs(cx[left] + cx[right] - 1) < 0.02 and abs(cy[left] - cy[right]) < 0.01
  assert abs(ax[left] - ax[right]) < 1e-6


def test_landmarks86_on_real_scut():
  root = shared_dataset('scut_fbp5500')
  landmarks = np.load(root / 'landmarks86.npy')
  shapes = fr.shapes_from_landmarks86(landmarks, 112)
  assert shapes.shape == (len(landmarks), fr.NUM_SHAPES, 6)
  # A handful of rows list points under the wrong part; all others are sane.
  assert fr.is_plausible(shapes).mean() > 0.99
  loaded = fr.load_face_shapes(root, data.read_folder(root))
  _check_layout(loaded)
  y = loaded[..., 2]
  eyes, nose, mouth = (fr.SHAPES.index(n) for n in ('right_eye', 'nose', 'mouth'))
  assert (y[:, eyes] < y[:, nose]).all() and (y[:, nose] < y[:, mouth]).all()
  assert (loaded[..., 1:3] > 0).all() and (loaded[..., 1:3] < 1).all()


# load_face_shapes on a tiny folder dataset.

def _ring(centre, radius, count):
  """`count` points on an ellipse 1.2 x wider than high (a circle has no principal axes)."""
  angles = np.linspace(0, 2 * np.pi, count, endpoint=False)
  return np.asarray(centre) + radius * np.stack([1.2 * np.cos(angles), np.sin(angles)], 1)


def _landmarks(shift=0.0):
  """Synthetic 86 points on rings at plausible places, in 20-px coordinates."""
  centres = [(10, 11, 8), (6, 6, 2), (14, 6, 2), (6, 8, 1.5), (14, 8, 1.5), (10, 11, 2),
             (10, 15, 3)]
  points = np.zeros((86, 2))
  for group, (x, y, r) in zip(fr.LANDMARKS86_GROUPS, centres):
    points[list(group)] = _ring((x + shift, y), r, len(group))
  points[[58, 59]] = (6 + shift, 8), (14 + shift, 8)
  return points


@pytest.fixture
def folder(tmp_path):
  """4 images 20x20: rows 0 and 3 have landmarks, row 1 has_landmarks=0, row 2 zeros."""
  root = tmp_path / 'faces'
  (root / 'images').mkdir(parents=True)
  lines = ['filename,has_landmarks,split']
  for i in range(4):
    Image.new('RGB', (20, 20), (9 * i, 0, 0)).save(root / 'images' / f'f{i}.png')
    lines.append(f'f{i}.png,{int(i != 1)},{"train" if i < 2 else "val"}')
  (root / 'labels.csv').write_text('\n'.join(lines) + '\n')
  landmarks = np.stack([_landmarks(), _landmarks(), np.zeros((86, 2)), _landmarks(1.0)])
  landmarks = landmarks.astype(np.float16)  # As SCUT-FBP5500's file.
  np.save(root / 'landmarks86.npy', landmarks)
  return root, landmarks


def test_load_face_shapes_rows_and_fallback(folder):
  root, landmarks = folder
  good = [fr.shapes_from_landmarks86(landmarks[i], 20) for i in (0, 3)]
  median = np.median(np.stack(good), axis=0)  # the dataset's own framing of a face
  val = data.read_folder(root, 'val')  # Rows 2 (zeros) and 3, so matching matters.
  shapes = fr.load_face_shapes(root, val)
  assert shapes.shape == (2, fr.NUM_SHAPES, 6) and shapes.dtype == np.float32
  np.testing.assert_allclose(shapes[0], median, atol=1e-6)
  np.testing.assert_allclose(shapes[1], good[1], atol=1e-6)
  train = fr.load_face_shapes(root, data.read_folder(root, 'train'))
  np.testing.assert_allclose(train[0], good[0], atol=1e-6)
  np.testing.assert_allclose(train[1], median, atol=1e-6)  # has_landmarks=0.


def test_load_face_shapes_without_landmarks_file(folder):
  root, _ = folder
  (root / 'landmarks86.npy').unlink()
  shapes = fr.load_face_shapes(root, data.read_folder(root))
  np.testing.assert_array_equal(shapes, np.tile(fr.shapes_from_template(), (4, 1, 1)))


def test_load_face_shapes_wrong_row_count(folder):
  root, landmarks = folder
  np.save(root / 'landmarks86.npy', landmarks[:3])
  with pytest.raises(DataError, match=r'landmarks86\.npy.*3 landmark rows.*4 rows'):
    fr.load_face_shapes(root, data.read_folder(root))


def test_regions_through_train_pipeline(folder):
  root, _ = folder
  examples = data.read_folder(root)
  shapes = fr.load_face_shapes(root, examples)
  batches = data.make_train_dataset(
      examples.paths, {'face_shapes': shapes}, batch_size=2, seed=0, cache_pp='decode|resize(16)',
      pp='face_regions|random_resized_crop(8)|flip_lr|value_range(-1, 1)')
  batch = next(batches)
  assert batch['regions'].shape == (2, 8, 8, R) and batch['face_shapes'].shape == (2, 7, 6)
  np.testing.assert_allclose(batch['regions'].sum(-1), 1, atol=1e-5)
