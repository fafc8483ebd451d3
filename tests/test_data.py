"""Tests for faceflax.data; fixtures are tiny generated images, never real faces."""

import itertools
from pathlib import Path

import numpy as np
from PIL import Image
import pytest

from faceflax import data
from faceflax.data import DataError, records

REAL_DATA = Path(__file__).parents[1].parent / 'shared' / 'data'
CACHE_PP = 'decode|resize(8)'
TRAIN_PP = 'random_resized_crop(6)|flip_lr|color_jitter(0.2, 0.2, 0.2)|value_range(-1, 1)'


def _write_image(path, value, mode='RGB', fmt=None):
  path.parent.mkdir(parents=True, exist_ok=True)
  color = value if mode == 'L' else (value, 255 - value, (7 * value) % 256)
  Image.new(mode, (12, 10), color).save(path, format=fmt)


def _write_csv(root, lines):
  (root / 'labels.csv').write_text('\n'.join(lines) + '\n')


@pytest.fixture
def folder(tmp_path):
  """10 images: rows 0-5 train, 6-7 val, 8-9 test; score = row index."""
  root = tmp_path / 'toy'
  lines = ['filename,score,group,split']
  for i in range(10):
    _write_image(root / 'images' / f'sub/im{i}.jpg', 20 * i)
    split = 'train' if i < 6 else 'val' if i < 8 else 'test'
    lines.append(f'sub/im{i}.jpg,{i},{"AF" if i % 2 else "CM"},{split}')
  _write_csv(root, lines)
  return root


@pytest.fixture
def official(tmp_path):
  root = tmp_path / 'SCUT-FBP5500_v2'
  for name in ('AF1', 'AF2', 'CM3', 'CM4'):
    _write_image(root / 'Images' / f'{name}.jpg', 50)
  lists = root / 'train_test_files'
  split_dir = lists / 'split_of_60%training and 40%testing'
  split_dir.mkdir(parents=True)
  (split_dir / 'train.txt').write_bytes(b'AF1.jpg 3.433333\r\nCM3.jpg 2.1\r\n\r\n\n')
  (split_dir / 'test.txt').write_text('AF2.jpg 4.0\nCM4.jpg 1.5\n')
  cv_dir = lists / '5_folders_cross_validations_files' / 'cross_validation_2'
  cv_dir.mkdir(parents=True)
  (cv_dir / 'train_2.txt').write_text('AF1.jpg 3.4\nAF2.jpg 4.0\nCM3.jpg 2.1\n')
  (cv_dir / 'test_2.txt').write_text('CM4.jpg 1.5\n')
  return root


def _train_batches(examples, num_batches, **kwargs):
  kwargs = {'batch_size': 4, 'pp': TRAIN_PP, 'seed': 0, 'cache_pp': CACHE_PP, **kwargs}
  iterator = data.make_train_dataset(examples.paths, {'score': examples.labels['score']},
                                     **kwargs)
  return list(itertools.islice(iterator, num_batches))


def _assert_batches_equal(actual, expected):
  assert len(actual) == len(expected)
  for a, e in zip(actual, expected):
    assert a.keys() == e.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], e[key], err_msg=key)


# Folder format.

def test_read_folder_all_rows_and_types(folder):
  examples = data.read_folder(folder, label_columns=('score',))
  assert examples.name == 'toy' and len(examples) == 10
  assert examples.paths[3] == str(folder / 'images' / 'sub' / 'im3.jpg')
  assert examples.labels['score'].dtype == np.float32
  np.testing.assert_array_equal(examples.labels['score'], np.arange(10))
  assert examples.labels['group'].dtype == object and examples.labels['group'][1] == 'AF'
  subset = examples.select(examples.labels['score'] > 7)
  assert subset.paths == examples.paths[8:] and list(subset.labels['score']) == [8, 9]


def test_read_folder_split(folder):
  examples = data.read_folder(folder, 'val')
  assert list(examples.labels['score']) == [6, 7]
  assert set(examples.labels['split']) == {'val'}


def test_read_folder_without_split_column_uses_all_rows(tmp_path):
  _write_image(tmp_path / 'images' / 'a.png', 1, mode='L', fmt='PNG')
  _write_image(tmp_path / 'images' / 'b.png', 2, mode='L', fmt='PNG')
  _write_csv(tmp_path, ['filename,subject', 'a.png,1', 'b.png,2'])
  assert len(data.read_folder(tmp_path, 'test')) == 2


def test_split_names_differing_in_case_or_spaces_are_the_same_split(folder, tmp_path, caplog):
  """' Train', 'TRAIN ' and 'train' are one split (in a folder, a store, and pretraining's
  selection); rows of other splits are counted in the log."""
  lines = (folder / 'labels.csv').read_text().splitlines()
  odd = {1: ' Train', 2: 'TRAIN ', 7: 'Val'}
  for row, name in odd.items():
    lines[row] = lines[row].rsplit(',', 1)[0] + f',{name}'
  _write_csv(folder, lines)
  with caplog.at_level('INFO'):
    train = data.read_folder(folder, 'train')
  assert len(train) == 6 and len(data.read_folder(folder, 'val')) == 2
  assert "6 rows of split 'train'; 4 rows in other splits ('test': 2, 'val': 2)" in caplog.text
  store = records.prepare_folder(folder, tmp_path / 'store')
  assert len(data.read_folder(store, ' TRAIN')) == 6
  everything = data.read_folder(folder)
  assert data.in_split(everything, 'train').sum() == 6
  assert len(data.list_unlabeled_images([folder])) == 6


def test_unknown_split_lists_available(folder):
  with pytest.raises(DataError, match=r"'nope'.*\['test', 'train', 'val'\]"):
    data.read_folder(folder, 'nope')


def test_missing_label_column(folder):
  with pytest.raises(DataError, match=r"labels\.csv: no column 'age'"):
    data.read_folder(folder, label_columns=('age',))


@pytest.mark.parametrize('bad', ['nan', 'abc', '', 'inf'])
def test_bad_label_value_names_line_column_value(folder, bad):
  lines = (folder / 'labels.csv').read_text().splitlines()
  lines[3] = lines[3].replace(',2,', f',{bad},')  # Row im2 is line 4.
  _write_csv(folder, lines)
  with pytest.raises(DataError, match=rf"labels\.csv: 1 bad label value\(s\): line 4: column 'score'.*'{bad}'"):
    data.read_folder(folder, label_columns=('score',))
  # Rows outside the selected split are not checked.
  assert len(data.read_folder(folder, 'val', label_columns=('score',))) == 2


@pytest.mark.parametrize('name', ['../outside.jpg', '/etc/passwd', 'sub/../../x.jpg'])
def test_filename_escaping_images_dir(folder, name):
  _write_csv(folder, ['filename,score', 'sub/im0.jpg,1', f'{name},2'])
  with pytest.raises(DataError, match=r'line 3.*must be a relative path'):
    data.read_folder(folder)


def test_missing_image_files(folder):
  for i in (1, 4):
    (folder / 'images' / 'sub' / f'im{i}.jpg').unlink()
  with pytest.raises(DataError, match=r'2 image file\(s\) missing.*im1\.jpg.*im4\.jpg'):
    data.read_folder(folder)
  assert len(data.read_folder(folder, check_files=False)) == 10


def test_missing_dirs_and_csv(folder, tmp_path):
  with pytest.raises(DataError, match='no such directory'):
    data.read_folder(tmp_path / 'absent')
  with pytest.raises(DataError, match='no such directory'):
    data.load_examples(tmp_path / 'absent', 'train')
  (folder / 'labels.csv').unlink()
  with pytest.raises(DataError, match=r'labels\.csv'):
    data.read_folder(folder)
  with pytest.raises(DataError, match='images'):
    data.read_folder(tmp_path)
  assert issubclass(DataError, ValueError)


# Official SCUT-FBP5500 layout.

def test_official_60_40(official):
  assert data.is_official_layout(official)
  train = data.read_official(official, 'train')
  assert [Path(p).name for p in train.paths] == ['AF1.jpg', 'CM3.jpg']
  np.testing.assert_allclose(train.labels['score'], [3.433333, 2.1], rtol=1e-6)
  test = data.load_examples(official, 'test', label_columns=('score',))
  assert [Path(p).name for p in test.paths] == ['AF2.jpg', 'CM4.jpg']


def test_official_cv_fold(official):
  train = data.load_examples(official, 'train', protocol='cv2')
  assert len(train) == 3 and train.labels['score'].dtype == np.float32
  assert [Path(p).name for p in data.read_official(official, 'test', 'cv2').paths] == ['CM4.jpg']


def test_official_errors(official):
  with pytest.raises(DataError, match=r"'cv9'.*'60_40'"):
    data.read_official(official, 'train', 'cv9')
  bad = official / 'train_test_files' / 'split_of_60%training and 40%testing' / 'test.txt'
  bad.write_text('AF2.jpg 4.0\nCM4.jpg\n')
  with pytest.raises(DataError, match=r'test\.txt: line 2'):
    data.read_official(official, 'test')
  bad.write_text('AF2.jpg 4.0\nCM4.jpg high\n')
  with pytest.raises(DataError, match=r"test\.txt: line 2: score 'high'"):
    data.read_official(official, 'test')


def test_folder_format_is_not_official(folder):
  assert not data.is_official_layout(folder)


# Unlabeled images.

def test_list_unlabeled_images(folder, tmp_path):
  plain = tmp_path / 'plain'
  _write_image(plain / 'b' / 'x.PNG', 1, fmt='PNG')
  _write_image(plain / 'a.jpeg', 2)
  (plain / 'notes.txt').write_text('not an image')
  paths = data.list_unlabeled_images([folder, str(plain)])
  assert paths[:6] == data.read_folder(folder, 'train').paths
  assert [Path(p).name for p in paths[6:]] == ['a.jpeg', 'x.PNG']
  with pytest.raises(DataError, match='no such directory'):
    data.list_unlabeled_images([tmp_path / 'absent'])


# Preprocessing ops.

def test_op_spec_parsing():
  fn = data.get_preprocess_fn(' resize((4, 6)) | value_range(lo=0, hi=1) |keep("image")')
  out = fn({'image': np.full((10, 12, 3), 255, np.uint8), 'other': np.zeros(1)})
  assert set(out) == {'image'}
  assert out['image'].shape == (4, 6, 3) and out['image'].dtype.name == 'float32'
  np.testing.assert_allclose(out['image'].numpy(), 1.0)


def test_op_spec_errors():
  with pytest.raises(ValueError, match=r"'rotate'.*known ops.*'flip_lr'"):
    data.get_preprocess_fn('decode|rotate(3)')
  with pytest.raises(ValueError, match='bad preprocessing op'):
    data.get_preprocess_fn('resize(__import__("os").getcwd())')
  with pytest.raises(ValueError, match='needs a per-example seed'):
    data.get_preprocess_fn('flip_lr')({'image': np.zeros((4, 4, 3), np.uint8)})


def test_register_custom_op():
  @data.register('test_invert')
  def get_invert():
    return lambda features: dict(features, image=255 - features['image'])
  out = data.get_preprocess_fn('test_invert')({'image': np.zeros((2, 2, 3), np.uint8)})
  assert int(out['image'][0, 0, 0]) == 255


# Pipelines.

def test_validation_names_corrupt_file(folder):
  examples = data.read_folder(folder)
  corrupt = folder / 'images' / 'sub' / 'im5.jpg'
  corrupt.write_bytes(corrupt.read_bytes()[:40])  # Truncated JPEG.
  with pytest.raises(DataError, match=r'1 unreadable image.*im5\.jpg'):
    _train_batches(examples, 1)
  with pytest.raises(DataError, match=r'im5\.jpg'):
    data.make_eval_dataset(examples.paths, {}, batch_size=4, pp='', cache_pp=CACHE_PP)


def test_greyscale_becomes_rgb(tmp_path):
  _write_image(tmp_path / 'images' / 'g.png', 90, mode='L', fmt='PNG')
  _write_image(tmp_path / 'images' / 'g.jpg', 90, mode='L')
  _write_csv(tmp_path, ['filename,label', 'g.png,0', 'g.jpg,1'])
  examples = data.read_folder(tmp_path)
  (batch,) = data.make_eval_dataset(examples.paths, examples.labels, batch_size=2,
                                    pp='', cache_pp=CACHE_PP)
  assert batch['image'].shape == (2, 8, 8, 3)
  np.testing.assert_allclose(batch['image'], 90, atol=2)


def test_train_batches_deterministic_per_seed(folder):
  examples = data.read_folder(folder)
  first = _train_batches(examples, 3)
  assert first[0]['image'].shape == (4, 6, 6, 3) and first[0]['image'].dtype == np.float32
  assert first[0]['score'].dtype == np.float32 and set(first[0]) == {'image', 'score'}
  epoch = np.concatenate([b['score'] for b in first[:2]])  # 10 examples -> 2 steps/epoch.
  assert len(set(epoch)) == 8  # No repeats within an epoch.
  _assert_batches_equal(_train_batches(examples, 3), first)
  other = _train_batches(examples, 3, seed=1)
  assert not all(np.array_equal(a['image'], b['image']) for a, b in zip(first, other))


@pytest.mark.parametrize('start_step', [1, 2, 5])
def test_train_exact_resume(folder, start_step):
  examples = data.read_folder(folder)
  full = _train_batches(examples, 7)
  _assert_batches_equal(_train_batches(examples, 7 - start_step, start_step=start_step),
                        full[start_step:])


def test_train_process_shards_union_is_global_batch(folder):
  examples = data.read_folder(folder)
  full = _train_batches(examples, 4, start_step=1)
  shards = [_train_batches(examples, 4, start_step=1, process_index=p, process_count=2)
            for p in range(2)]
  for step, batch in enumerate(full):
    for key in batch:
      np.testing.assert_array_equal(
          np.concatenate([shard[step][key] for shard in shards]), batch[key])


@pytest.mark.parametrize('process_count', [1, 2])
def test_eval_every_example_once_with_mask(folder, process_count):
  examples = data.read_folder(folder)
  per_process = []
  for p in range(process_count):
    batches = data.make_eval_dataset(
        examples.paths, {'score': examples.labels['score']}, batch_size=4,
        pp='value_range(0, 1)', process_index=p, process_count=process_count,
        cache_pp=CACHE_PP)
    assert len(batches) == 3 and len(list(batches)) == 3  # Re-iterable.
    per_process.append(list(batches))
    for batch in batches:
      assert batch['mask'].dtype == bool and len(batch['mask']) == 4 // process_count
  scores = np.concatenate([b['score'][b['mask']] for pb in per_process for b in pb])
  assert sorted(scores) == list(range(10))
  num_padding = sum((~b['mask']).sum() for pb in per_process for b in pb)
  assert num_padding == 2
  if process_count == 1:  # In order, padding at the end.
    np.testing.assert_array_equal(scores, np.arange(10))
    assert list(per_process[0][-1]['mask']) == [True, True, False, False]


def test_empty_selection(folder):
  with pytest.raises(DataError, match='no examples'):
    data.make_train_dataset([], {}, batch_size=2, pp='', seed=0)
  with pytest.raises(DataError, match='do not fill one batch'):
    _train_batches(data.read_folder(folder, 'val'), 1)


# Real data (skipped in a fresh clone).

def test_real_scut_fbp5500_smoke():
  root = REAL_DATA / 'scut_fbp5500'
  if not root.is_dir():
    pytest.skip(f'{root} not available')
  examples = data.load_examples(root, 'val', label_columns=('score',))
  assert len(examples) > 100 and examples.name == 'scut_fbp5500'
  scores = examples.labels['score']
  assert 1 <= scores.min() and scores.max() <= 5
  subset = examples.select(np.arange(64))
  batch = next(data.make_train_dataset(subset.paths, {'score': subset.labels['score']},
                                        batch_size=32, pp='flip_lr|value_range(-1, 1)',
                                        seed=0, cache_pp='decode|resize(32)'))
  assert batch['image'].shape == (32, 32, 32, 3)
  assert -1 <= batch['image'].min() < batch['image'].max() <= 1
