"""Tests for low-quality face recognition data: `degrade`, verification pairs and metrics."""

import io
import os
import pickle

import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from faceflax import data
from faceflax import metrics
from faceflax.data import DataError
from faceflax.data import pairs
from tests.conftest import shared_dataset

RANDOM_PP = ('degrade(resolution=(14, 28, 56), blur=(0.5, 2), blur_prob=0.5, noise=(2, 10), '
             'noise_prob=0.5, jpeg=(30, 90), jpeg_prob=0.5)')


def _image(size=112, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def _degrade(spec, image, seed=None):
  features = {'image': image} if seed is None else {'image': image, 'rng': np.array([seed, 7])}
  out = data.get_preprocess_fn(spec)(features)
  return {k: v.numpy() for k, v in out.items()}


# The degrade op.

def test_degrade_deterministic_per_seed_and_keeps_image():
  image = _image()
  first = _degrade(RANDOM_PP, image, seed=1)
  np.testing.assert_array_equal(first['image'], image)
  assert first['image_lq'].dtype == np.uint8 and first['image_lq'].shape == image.shape
  np.testing.assert_array_equal(_degrade(RANDOM_PP, image, seed=1)['image_lq'],
                                first['image_lq'])
  others = [_degrade(RANDOM_PP, image, seed=s)['image_lq'] for s in range(2, 6)]
  assert all(not np.array_equal(o, first['image_lq']) for o in others)
  assert not np.array_equal(first['rng'], [1, 7])  # Later ops get a fresh seed.


def test_degrade_inside_tf_data_matches_eager():
  features = {'image': _image(), 'rng': np.array([3, 7])}
  dataset = tf.data.Dataset.from_tensors(features).map(data.get_preprocess_fn(RANDOM_PP))
  np.testing.assert_array_equal(next(iter(dataset))['image_lq'].numpy(),
                                _degrade(RANDOM_PP, features['image'], seed=3)['image_lq'])


def test_resolution_is_area_down_then_bicubic_up():
  image = _image()
  expected = tf.image.resize(tf.image.resize(tf.cast(image, tf.float32), (28, 28), 'area'),
                             (112, 112), 'bicubic')
  expected = tf.saturate_cast(tf.round(tf.clip_by_value(expected, 0, 255)), tf.uint8)
  np.testing.assert_array_equal(_degrade('degrade(resolution=28)', image)['image_lq'], expected)
  bilinear = _degrade('degrade(resolution=28, upsample="bilinear")', image)['image_lq']
  assert not np.array_equal(bilinear, expected)


def test_resolution_removes_detail():
  checkerboard = (np.indices((112, 112)).sum(0) % 2 * 255).astype(np.uint8)
  checkerboard = np.repeat(checkerboard[..., None], 3, axis=-1)
  flat = _degrade('degrade(resolution=14)', checkerboard)['image_lq'].astype(int)
  assert flat.max() - flat.min() <= 1 and abs(flat.mean() - 127.5) <= 1
  # Coarse detail that 14 px can represent survives.
  blocks = np.kron(checkerboard[:14, :14], np.ones((8, 8, 1), np.uint8))
  assert _degrade('degrade(resolution=14)', blocks)['image_lq'].std() > 50


def test_deterministic_degrade_needs_no_rng_random_one_does():
  image = _image(32)
  out = _degrade('degrade(resolution=8, blur=1.0, jpeg=50)', image)
  assert set(out) == {'image', 'image_lq'}
  with pytest.raises(ValueError, match='needs a per-example seed'):
    _degrade('degrade(resolution=(8, 16))', image)
  with pytest.raises(ValueError, match='needs a per-example seed'):
    _degrade('degrade(noise=3)', image)
  with pytest.raises(ValueError, match='needs a per-example seed'):
    _degrade('degrade(blur=1.0, blur_prob=0.5)', image)


def test_degrade_in_eval_pipeline(tmp_path):
  paths = []
  for i in range(3):
    paths.append(str(tmp_path / f'{i}.png'))
    Image.fromarray(_image(16, seed=i)).save(paths[-1])
  (batch,) = data.make_eval_dataset(paths, {}, batch_size=3, cache_pp='decode',
                                    pp='degrade(resolution=4)|value_range(0, 1)')
  assert batch['image'].shape == batch['image_lq'].shape == (3, 16, 16, 3)
  assert batch['image_lq'].dtype == np.float32 and batch['image_lq'].max() <= 1
  assert not np.allclose(batch['image'], batch['image_lq'])


@pytest.mark.parametrize('step', ['blur=1.5', 'noise=5', 'jpeg=30'])
def test_each_step_changes_image_only_when_on(step):
  image = _image(32)
  name = step.split('=')[0]
  changed = _degrade(f'degrade({step})', image, seed=0)['image_lq']
  assert changed.dtype == np.uint8 and np.abs(changed.astype(int) - image).mean() > 1
  for spec in ('degrade', f'degrade({step}, {name}_prob=0)', f'degrade({name}=None)'):
    np.testing.assert_array_equal(_degrade(spec, image, seed=0)['image_lq'], image, err_msg=spec)
  sometimes = [_degrade(f'degrade({step}, {name}_prob=0.5)', image, seed=s)['image_lq']
               for s in range(12)]
  assert {np.array_equal(lq, image) for lq in sometimes} == {True, False}


def test_blur_matches_scipy_gaussian_filter():
  ndimage = pytest.importorskip('scipy.ndimage')
  image = _image(24).astype(np.float32)
  blurred = _degrade('degrade(blur=1.5)', image)['image_lq']
  assert blurred.dtype == np.float32
  expected = ndimage.gaussian_filter(image, sigma=(1.5, 1.5, 0), mode='reflect', truncate=3.0)
  np.testing.assert_allclose(blurred, expected, atol=1e-3)


def test_noise_sigma_and_jpeg_quality():
  grey = np.full((112, 112, 3), 128.0, np.float32)
  noisy = _degrade('degrade(noise=10)', grey, seed=0)['image_lq']
  assert abs(noisy.std() - 10) < 0.3 and abs(noisy.mean() - 128) < 0.3
  image = _image(32)
  expected = tf.image.adjust_jpeg_quality(image, 40).numpy()
  np.testing.assert_array_equal(_degrade('degrade(jpeg=40)', image)['image_lq'], expected)


def test_degrade_rejects_bad_settings():
  for spec in ('degrade(blur=(2, 1))', 'degrade(jpeg=(50, 120))', 'degrade(noise_prob=2)',
               'degrade(resolution=(14, -1))', 'degrade(upsample="nearest")'):
    with pytest.raises(ValueError, match='degrade'):
      data.get_preprocess_fn(spec)


def test_flip_keeps_image_and_image_lq_aligned():
  image = np.tile(np.arange(32, dtype=np.uint8)[None, :, None] * 8, (32, 1, 3))  # Left-right ramp.
  reference = _degrade('degrade(resolution=8)', image)['image_lq']
  flips = []
  for seed in range(10):
    out = _degrade('degrade(resolution=8)|flip_lr', image, seed=seed)
    flipped = np.array_equal(out['image'], image[:, ::-1])
    assert flipped or np.array_equal(out['image'], image)
    np.testing.assert_array_equal(out['image_lq'], reference[:, ::-1] if flipped else reference)
    flips.append(flipped)
  assert set(flips) == {True, False}


def test_flip_draw_unchanged_for_single_image():
  image = _image(8)
  for seed in range(6):
    rng = np.array([seed, 7])
    old_seed = tf.unstack(tf.random.experimental.stateless_split(rng, 2))[0]
    expected = tf.image.stateless_random_flip_left_right(image, seed=old_seed)
    np.testing.assert_array_equal(_degrade('flip_lr', image, seed=seed)['image'], expected)


def test_later_ops_transform_both_images_alike():
  pp = 'degrade|random_resized_crop(20)|flip_lr|color_jitter|resize(16)|value_range(-1, 1)'
  for seed in range(4):
    out = _degrade(pp, _image(32), seed=seed)
    assert out['image_lq'].dtype == np.float32 and out['image_lq'].shape == (16, 16, 3)
    np.testing.assert_array_equal(out['image_lq'], out['image'])


# Pairs CSV.

def _write_pairs(root, lines, names=('a.jpg', 'b.jpg', 'c.jpg')):
  (root / 'images').mkdir(exist_ok=True)
  for name in names:
    Image.new('RGB', (4, 4)).save(root / 'images' / name)
  (root / 'pairs.csv').write_text('\n'.join(lines) + '\n')
  return root / 'pairs.csv'


def test_read_pairs_csv(tmp_path):
  csv_path = _write_pairs(tmp_path, ['file_a,file_b,same', 'a.jpg,b.jpg,1', 'a.jpg,c.jpg,0',
                                     'b.jpg,c.jpg,True', 'c.jpg,a.jpg, false'])
  result = pairs.read_pairs_csv(csv_path, tmp_path / 'images')
  assert len(result) == 4 and result.same.dtype == bool
  assert list(result.same) == [True, False, True, False]
  assert result.paths_a[1] == str(tmp_path / 'images' / 'a.jpg')
  assert result.paths_b[1] == str(tmp_path / 'images' / 'c.jpg')
  _write_pairs(tmp_path, ['filename_a,filename_b,same', 'a.jpg,b.jpg,1'])
  assert list(pairs.read_pairs_csv(csv_path, tmp_path / 'images').same) == [True]


@pytest.mark.parametrize('lines, message', [
    (['file_a,same', 'a.jpg,1'], r"pairs\.csv: line 1: no column 'file_b' or 'filename_b'"),
    (['file_a,file_b,same', 'a.jpg,b.jpg,1', 'a.jpg,c.jpg,yes'],
     r"pairs\.csv: line 3: column 'same' must be 0, 1, true or false, got 'yes'"),
    ([''], r'pairs\.csv: empty file'),
    (['file_a,file_b,same'], r'pairs\.csv: no pairs'),
    (['file_a,file_b,same', 'a.jpg,b.jpg'], r'pairs\.csv: line 2: expected 3 fields'),
    (['file_a,file_b,same', 'a.jpg,b.jpg,1', 'a.jpg,../x.jpg,0'],
     r"pairs\.csv: line 3: column 'file_b': filename '\.\./x\.jpg' must be a relative path"),
    (['file_a,file_b,same', 'a.jpg,/etc/passwd,0'], r"line 2: column 'file_b'.*relative path"),
    (['file_a,file_b,same', 'a.jpg,b.jpg,1', 'd.jpg,c.jpg,0'],
     r"pairs\.csv: 1 image file\(s\) missing, e\.g\. line 3 column 'file_a': .*d\.jpg"),
])
def test_read_pairs_csv_errors(tmp_path, lines, message):
  csv_path = _write_pairs(tmp_path, lines)
  with pytest.raises(DataError, match=message):
    pairs.read_pairs_csv(csv_path, tmp_path / 'images')


def test_real_celeba_id_pairs():
  root = shared_dataset('celeba_id')
  result = pairs.read_pairs_csv(root / 'pairs_val.csv', root / 'images')
  assert len(result) == 3000 and result.same.sum() == 1500
  assert all(p.startswith(str(root / 'images')) for p in result.paths_a[:10])


# Insightface .bin files.

def _encoded(value, fmt='JPEG'):
  buffer = io.BytesIO()
  Image.new('RGB', (6, 6), (value, 0, 0)).save(buffer, format=fmt)
  return buffer.getvalue()


def test_bin_round_trip(tmp_path):
  images_a = [_encoded(i) for i in range(3)]
  images_b = [_encoded(50 + i, 'PNG') for i in range(3)]
  pairs.write_bin(tmp_path / 'toy.bin', images_a, images_b, [True, False, True])
  result = pairs.read_bin(tmp_path / 'toy.bin')
  assert len(result) == 3 and result.same.dtype == bool and list(result.same) == [1, 0, 1]
  assert result.images_a.dtype == object and list(result.images_a) == images_a
  assert list(result.images_b) == images_b
  decoded = tf.io.decode_image(result.images_b[1]).numpy()
  assert decoded[0, 0, 0] == 51


@pytest.mark.parametrize('module_name', ['numpy._core.multiarray', 'numpy.core.multiarray'])
def test_bin_with_numpy_items(tmp_path, module_name):
  """Some .bin files hold numpy bools and uint8 arrays, pickled by numpy 1 or 2."""
  bins = [np.frombuffer(_encoded(i), np.uint8) for i in range(4)]
  raw = pickle.dumps((bins, [np.bool_(True), np.bool_(False)]), protocol=3)
  raw = raw.replace(b'numpy._core.multiarray', module_name.encode())
  (tmp_path / 'np.bin').write_bytes(raw)
  result = pairs.read_bin(tmp_path / 'np.bin')
  assert list(result.same) == [True, False] and result.images_b[1] == _encoded(3)


class _Evil:
  def __init__(self, function, argument):
    self.function, self.argument = function, argument

  def __reduce__(self):
    return self.function, (self.argument,)


@pytest.mark.parametrize('function, name', [(os.system, 'system'), (eval, 'builtins.eval')])
def test_bin_refuses_code_in_pickle(tmp_path, function, name):
  sentinel = tmp_path / 'pwned'
  argument = (f'touch {sentinel}' if function is os.system
              else f'open({str(sentinel)!r}, "w").close()')
  payload = pickle.dumps(([_Evil(function, argument), _encoded(1)], [True]))
  (tmp_path / 'evil.bin').write_bytes(payload)
  with pytest.raises(DataError, match=rf'evil\.bin: refusing to load global .*{name}'):
    pairs.read_bin(tmp_path / 'evil.bin')
  assert not sentinel.exists()


@pytest.mark.parametrize('content, message', [
    (b'not a pickle at all', 'not a readable pickle'),
    (pickle.dumps({'images': []}), r'expected a pickled \(images, issame\) pair'),
    (pickle.dumps(([b'\xff\xd8\xff'] * 3, [True])), 'odd number of images'),
    (pickle.dumps(([b'\xff\xd8\xff'] * 4, [True])), '4 images for 1 pairs; expected 2'),
    (pickle.dumps(([b'\xff\xd8\xff', 'text'], [True])), r'image 1 \(pair 0\) is not an encoded'),
    (pickle.dumps(([b'\xff\xd8\xff'] * 2, ['yes'])), 'issame flags must be booleans'),
])
def test_bin_errors_name_the_file(tmp_path, content, message):
  (tmp_path / 'bad.bin').write_bytes(content)
  with pytest.raises(DataError, match=rf'bad\.bin: {message}'):
    pairs.read_bin(tmp_path / 'bad.bin')


# Verification metrics.

def _brute_force_best_accuracy(similarity, same):
  thresholds = np.append(np.unique(similarity), -np.inf)
  return max(np.mean((similarity > t) == same) for t in thresholds)


@pytest.mark.parametrize('seed', range(5))
def test_best_threshold_matches_brute_force(seed):
  rng = np.random.default_rng(seed)
  same = rng.random(300) < 0.4
  similarity = np.round(rng.normal(same * 0.8, 1.0), 1)  # Rounding makes ties.
  threshold = metrics.best_threshold(similarity, same)
  best = _brute_force_best_accuracy(similarity, same)
  assert np.mean((similarity > threshold) == same) == best


def test_best_threshold_extremes():
  assert metrics.best_threshold([0.1, 0.5, 0.9], [True, True, True]) < 0.1
  assert metrics.best_threshold([0.1, 0.5, 0.9], [False, False, False]) == 0.9
  assert metrics.best_threshold([0.2, 0.4], [False, True]) == pytest.approx(0.3)


def test_verification_folds_stratified_and_deterministic():
  same = np.arange(1003) % 3 == 0
  folds = metrics.verification_folds(1003, 10, seed=4, same=same)
  np.testing.assert_array_equal(folds, metrics.verification_folds(1003, 10, seed=4, same=same))
  assert not np.array_equal(folds, metrics.verification_folds(1003, 10, seed=5, same=same))
  sizes = np.bincount(folds)
  assert len(sizes) == 10 and sizes.max() - sizes.min() <= 1
  for cls in (same, ~same):
    counts = np.bincount(folds[cls], minlength=10)
    assert counts.min() >= 1 and counts.max() - counts.min() <= 1
  plain = np.bincount(metrics.verification_folds(25, 10))
  assert plain.max() - plain.min() <= 1
  with pytest.raises(ValueError, match='both classes'):
    metrics.verification_folds(20, 10, same=np.arange(20) < 5)


def test_verification_accuracy():
  rng = np.random.default_rng(0)
  same = rng.random(2000) < 0.5
  separable = np.where(same, rng.uniform(0.6, 1, 2000), rng.uniform(-1, 0.4, 2000))
  result = metrics.verification_accuracy(separable, same)
  assert result == {'accuracy': 1.0, 'accuracy_std': 0.0, 'threshold': result['threshold']}
  assert 0.4 < result['threshold'] < 0.6
  chance = metrics.verification_accuracy(rng.normal(size=2000), same)
  assert abs(chance['accuracy'] - 0.5) < 0.05 and chance['accuracy_std'] > 0


def _brute_force_tar_at_far(similarity, same, far):
  for t in np.sort(np.append(similarity, -np.inf)):
    if np.mean(similarity[~same] > t) <= far:
      return np.mean(similarity[same] > t), t


@pytest.mark.parametrize('seed, far', [(0, 1e-2), (1, 1e-2), (2, 0.1), (3, 0.05)])
def test_tar_at_far_matches_brute_force(seed, far):
  rng = np.random.default_rng(seed)
  same = rng.random(1000) < 0.5
  similarity = np.round(rng.normal(same * 1.5, 1.0), 2)
  assert metrics.tar_at_far(similarity, same, far) == _brute_force_tar_at_far(
      similarity, same, far)


def test_tar_at_far_too_few_different_pairs():
  same = np.arange(600) < 100  # 500 different pairs cannot resolve FAR 1e-3.
  tar, threshold = metrics.tar_at_far(np.linspace(0, 1, 600), same, far=1e-3)
  assert np.isnan(tar) and np.isnan(threshold)


def test_roc_curve_monotone():
  rng = np.random.default_rng(0)
  same = rng.random(500) < 0.3
  similarity = np.round(rng.normal(same * 1.0, 1.0), 1)
  far, tar, thresholds = metrics.roc_curve(similarity, same)
  assert len(far) == len(tar) == len(thresholds) == len(np.unique(similarity)) + 1
  assert (np.diff(far) >= 0).all() and (np.diff(tar) >= 0).all()
  assert (np.diff(thresholds) < 0).all()
  assert (far[0], tar[0], far[-1], tar[-1]) == (0, 0, 1, 1)
  i = len(thresholds) // 2
  assert far[i] == np.mean(similarity[~same] > thresholds[i])
  assert tar[i] == np.mean(similarity[same] > thresholds[i])
